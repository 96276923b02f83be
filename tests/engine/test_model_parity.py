"""Our torch runtime over the paged KV cache against transformers' forward, fp32.

Each test feeds sequences through hand-built ForwardBatches (one-chunk prefill, chunked
prefill, batched decode, mixed decode+prefill steps), block_size 4 so sequences span
several non-contiguous blocks, and compares every logits row we produce with
transformers' logits for the same position of the full sequence.

Tolerance: fp32 keeps ~7 significant digits; our kernels differ from transformers' only
in summation order (fused q/k/v and gate/up projections, batch-1 matrix-vector kernels
against transformers' whole-sequence GEMMs, the RMSNorm reduction, grouped-query SDPA),
which moves these tiny models' logits (magnitude 1-10) by ~3e-6. atol 1e-4 leaves
room for that while any real error (rope convention, a mask off by one, a wrong KV
slot or head mapping) moves logits by 1e-2 or more.
"""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file

from engine import loader
from engine.default_model import find_default_gguf
from engine.models.rope import RopeTable, interleave_rope_rows, inv_freq
from engine.runtime.base import ModelSpec
from engine.runtime.torch_runtime import TorchRuntime
from tests.checkpoints import TINY_CONFIGS
from tests.engine.paged_driver import Pager, Seq, step

ATOL = 1e-4
BLOCK_SIZE = 4


def make_runtime(folder, num_blocks=64):
    spec = loader.load_spec(folder)
    runtime = TorchRuntime(spec, loader.load_weights(folder, torch.float32), torch.float32, torch.device("cpu"))
    runtime.init_kv_cache(num_blocks, BLOCK_SIZE)
    return runtime


def reference(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


class Recorder:
    """Our logits per (sequence, position); greedy-extends each sequence as it goes."""

    def __init__(self):
        self.rows = {}

    def take(self, seqs, logits):
        for seq, row in zip(seqs, logits):
            self.rows[(id(seq), seq.fed - 1)] = row
            seq.tokens.append(int(row.argmax()))

    def check(self, ref_model, seqs, atol=ATOL):
        compared = 0
        for seq in seqs:
            with torch.no_grad():
                # Sequence minus the last greedy token, which was never fed.
                ref = ref_model(torch.tensor([seq.tokens[:-1]])).logits[0]
            for (key, pos), ours in self.rows.items():
                if key != id(seq):
                    continue
                torch.testing.assert_close(ours, ref[pos], atol=atol, rtol=0)
                # Greedy decoding agrees token for token.
                assert int(ours.argmax()) == int(ref[pos].argmax())
                compared += 1
        return compared


def prompt(n, seed):
    return torch.randint(0, 49152, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def references(tiny_checkpoints):
    return {kind: reference(folder) for kind, folder in tiny_checkpoints.items()}


@pytest.mark.parametrize("kind", list(TINY_CONFIGS))
def test_prefill_then_decode(kind, tiny_checkpoints, references):
    runtime, pager, rec = make_runtime(tiny_checkpoints[kind]), Pager(64, BLOCK_SIZE), Recorder()
    seq = Seq(prompt(11, 1))
    rec.take([seq], step(runtime, pager, [], [(seq, 11)]))
    for _ in range(7):  # to 18 tokens: five blocks
        rec.take([seq], step(runtime, pager, [seq], []))
    assert rec.check(references[kind], [seq]) == 8


@pytest.mark.parametrize("kind", list(TINY_CONFIGS))
def test_chunked_prefill(kind, tiny_checkpoints, references):
    runtime, pager, rec = make_runtime(tiny_checkpoints[kind]), Pager(64, BLOCK_SIZE), Recorder()
    seq = Seq(prompt(13, 2))
    for n in (5, 4, 4):  # chunks that start and end mid-block, on top of a cached prefix
        logits = step(runtime, pager, [], [(seq, n)])
        if seq.fed < 13:
            rec.rows[(id(seq), seq.fed - 1)] = logits[0]  # mid-prompt: record, do not extend
        else:
            rec.take([seq], logits)
    for _ in range(3):
        rec.take([seq], step(runtime, pager, [seq], []))
    assert rec.check(references[kind], [seq]) == 6


@pytest.mark.parametrize("kind", list(TINY_CONFIGS))
def test_batched_decode_with_mixed_steps(kind, tiny_checkpoints, references):
    runtime, pager, rec = make_runtime(tiny_checkpoints[kind]), Pager(64, BLOCK_SIZE), Recorder()
    a, b, c = Seq(prompt(9, 3)), Seq(prompt(5, 4)), Seq(prompt(10, 5))
    rec.take([a, b], step(runtime, pager, [], [(a, 9), (b, 5)]))  # two prefills in one pass
    logits = step(runtime, pager, [a, b], [(c, 4)])  # decodes + first chunk of c
    rec.take([a, b], logits[:2])
    rec.rows[(id(c), 3)] = logits[2]
    rec.take([a, b, c], step(runtime, pager, [a, b], [(c, 6)]))  # decodes + c's cached-prefix chunk
    for _ in range(4):  # sequences of different lengths decoded together
        rec.take([a, b, c], step(runtime, pager, [a, b, c], []))
    assert rec.check(references[kind], [a, b, c]) == 7 + 7 + 6


def test_mistral_sliding_window(tmp_path, tiny_checkpoints):
    """A window shorter than the sequences: prefill, chunked prefill and decode must all
    drop the keys that fell out of it, as transformers' sliding-window mask does."""
    folder = tmp_path / "mistral-window"
    shutil.copytree(tiny_checkpoints["mistral"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "sliding_window": 5}))
    runtime, pager, rec = make_runtime(folder), Pager(64, BLOCK_SIZE), Recorder()
    assert runtime.spec.sliding_window == 5
    a, b = Seq(prompt(11, 8)), Seq(prompt(9, 9))
    rec.take([a], step(runtime, pager, [], [(a, 11)]))
    logits = step(runtime, pager, [a], [(b, 4)])
    rec.take([a], logits[:1])
    rec.rows[(id(b), 3)] = logits[1]
    rec.take([a, b], step(runtime, pager, [a], [(b, 5)]))  # b's chunk over a cached prefix
    for _ in range(5):
        rec.take([a, b], step(runtime, pager, [a, b], []))
    assert rec.check(reference(folder), [a, b]) == 8 + 7


def test_copy_blocks_forks_a_sequence(tiny_checkpoints):
    runtime, pager = make_runtime(tiny_checkpoints["llama"]), Pager(64, BLOCK_SIZE)
    seq = Seq(prompt(10, 6))
    step(runtime, pager, [], [(seq, 10)])
    # Fork: the child gets fresh blocks holding a copy of the parent's cache.
    child = Seq(list(seq.tokens), fed=seq.fed, table=[pager.free.pop() for _ in seq.table])
    runtime.copy_blocks(list(zip(seq.table, child.table)))
    # Wipe the parent's blocks: the child must not be reading them.
    runtime.kv_cache[:, seq.table] = 0
    seq.tokens.append(7)
    child.tokens.append(7)
    forked = step(runtime, pager, [child], [])
    fresh_runtime, fresh_pager = make_runtime(tiny_checkpoints["llama"]), Pager(64, BLOCK_SIZE)
    again = Seq(list(seq.tokens))
    step(fresh_runtime, fresh_pager, [], [(again, 10)])
    expected = step(fresh_runtime, fresh_pager, [again], [])
    torch.testing.assert_close(forked, expected, atol=ATOL, rtol=0)


def test_fp8_request_on_cpu_warns_and_runs_unquantized(tiny_llama, caplog):
    spec = loader.load_spec(tiny_llama)
    with caplog.at_level(logging.WARNING, logger="engine.runtime.torch_runtime"):
        runtime = TorchRuntime(spec, loader.load_weights(tiny_llama, torch.float32), torch.float32, "cpu",
                               use_fp8=True)
    assert runtime.fp8_enabled is False
    assert "FP8 is unavailable on this device (cpu); running in float32" in caplog.text


def test_kv_blocks_from_cpu_budget(tiny_llama):
    from engine.config import EngineConfig

    runtime = make_runtime(tiny_llama)
    per_block = runtime.kv_cache_bytes_per_block(16)
    assert per_block == 2 * 2 * 2 * 16 * 16 * 4  # k+v, layers, kv heads, head_dim, tokens, fp32
    assert runtime.num_kv_blocks(EngineConfig(kv_cache_bytes=per_block * 10 + 1)) == 10
    # Never more than max_num_seqs full-length sequences can use.
    assert runtime.num_kv_blocks(EngineConfig(max_num_seqs=2), max_model_len=64) == 2 * 4
    assert runtime.num_kv_blocks(EngineConfig(num_kv_blocks=3)) == 3


@pytest.mark.parametrize("scaling", [
    None,
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 128},
])
def test_rope_frequencies_equal_transformers(scaling):
    params = {"rope_type": "default", "rope_theta": 500000.0, **(scaling or {})}
    config = transformers.LlamaConfig(hidden_size=512, num_attention_heads=4, max_position_embeddings=1024,
                                      rope_parameters=params)
    rope = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config)
    spec = ModelSpec(
        architecture="llama", vocab_size=10, hidden_size=512, intermediate_size=8, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, head_dim=128, rms_norm_eps=1e-6, rope_theta=500000.0,
        max_position_embeddings=1024, tie_word_embeddings=False, rope_scaling=scaling,
    )
    assert torch.equal(inv_freq(spec), rope.inv_freq)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_rotation_equals_transformers(dtype, tiny_checkpoints):
    """Our in-place rotation in the interleaved layout (complex multiply in float32, real
    arithmetic otherwise) against transformers' apply_rotary_pos_emb on the same vectors."""
    from transformers.models.llama import modeling_llama

    config = transformers.AutoConfig.from_pretrained(str(tiny_checkpoints["llama3-rope"]))
    spec = loader.load_spec(tiny_checkpoints["llama3-rope"])
    positions = torch.tensor([0, 1, 5, 77, 300, 1000])
    x = torch.randn(len(positions), 6, spec.head_dim, generator=torch.Generator().manual_seed(0)).to(dtype)
    cos, sin = modeling_llama.LlamaRotaryEmbedding(config)(x, positions[None])
    q = x.transpose(0, 1)[None]  # [1, heads, T, d]
    expected = modeling_llama.apply_rotary_pos_emb(q, q, cos, sin)[0][0].transpose(0, 1)  # [T, heads, d]
    table = RopeTable(spec, spec.max_position_embeddings, dtype, "cpu")
    ours = interleave_rope_rows(x.transpose(0, 2), 1).transpose(0, 2).contiguous()  # per-head dims interleaved
    table.apply_(ours, table.lookup(positions))
    half = spec.head_dim // 2
    ours = ours.unflatten(-1, (half, 2)).transpose(-1, -2).flatten(-2)  # back to rotate-half order
    if dtype == torch.float32:
        torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)
    else:  # same ops in the same order, each rounded to bf16: identical
        assert torch.equal(ours, expected)


# --- the default model, converted from its GGUF ---------------------------------------


# 30 layers of fp32 in a different summation order (our batch-1 GEMVs against
# transformers' whole-sequence GEMMs) drift further than the tiny models: on these logits
# (magnitude ~30) ours sit ~1.2e-4 from a float64 run of transformers, transformers' own
# fp32 run ~7e-5. Real errors move logits by 1e-2 and more.
DEFAULT_MODEL_ATOL = 5e-4


def test_default_model_matches_transformers(default_model_folder):
    runtime, pager, rec = make_runtime(default_model_folder, num_blocks=32), Pager(32, BLOCK_SIZE), Recorder()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(default_model_folder))
    ids = tokenizer("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
    seq = Seq(list(ids))
    step(runtime, pager, [], [(seq, 9)])
    rec.take([seq], step(runtime, pager, [], [(seq, len(ids) - 9)]))
    for _ in range(8):
        rec.take([seq], step(runtime, pager, [seq], []))
    assert rec.check(reference(default_model_folder), [seq], atol=DEFAULT_MODEL_ATOL) == 9


def test_converted_tensors_equal_transformers_gguf_loader(default_model_folder):
    gguf = find_default_gguf()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    ).state_dict()
    ours = load_file(default_model_folder / "model.safetensors")
    config = json.loads((default_model_folder / "config.json").read_text())
    assert config["tie_word_embeddings"] and "lm_head.weight" not in ours
    assert set(ours) == set(theirs) - {"lm_head.weight"}
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, theirs[name]), name
