"""BeamSearch against transformers' model.generate(num_beams=...).

The harness plays the engine: each step it runs a plain forward (no cache) over every
live beam's full sequence and hands the last logits to BeamSearch.step. Compared: the
returned sequences, sequences_scores, and the number of steps (transformers' forward
calls), which pins down the stopping rules.

Two models: tests/checkpoints' tiny Llama (random weights), and a zero-layer Llama
whose logits are a designed bigram table, to force rare situations (every beam
finishing early, eos ids crowding out all candidates).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import transformers

from engine.params import SamplingParams
from engine.sampling.beam_search import BeamSearch
from tests.checkpoints import TINY_CONFIGS

PROMPTS = [[1, 517, 901, 33, 410], [1, 12, 1000, 7]]
MAX_NEW = 8
# Pads transformers' shorter outputs. Not 0: transformers pads with `pad or eos[0]`, so
# a pad id of 0 (a falsy tensor) would pad with eos instead.
PAD = 5
NO_EOS = 2  # an eos id these prompts never reach


@pytest.fixture(scope="module")
def model():
    # tests/checkpoints' tiny Llama with a 1024-token vocabulary: the 49k-wide lm_head
    # would dominate the run time, and beam search needs no tokenizer.
    config = TINY_CONFIGS["llama"]()
    config.vocab_size = 1024
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@torch.no_grad()
def next_logits(model, sequences: list[list[int]]) -> torch.Tensor:
    return model(torch.tensor(sequences)).logits[:, -1, :].float()


def run_ours(model, prompt, params, generator=None):
    """-> (hypotheses, number of steps)"""
    search = BeamSearch(params, prompt, MAX_NEW, generator=generator)
    assert search.live_beams == [[]]
    steps = 0
    while not search.done:
        before = search.live_beams
        step = search.step(next_logits(model, [prompt + beam for beam in before]))
        steps += 1
        # The engine contract: new beam k is old beam parents[k] plus tokens[k].
        assert len(step.parents) == params.num_beams
        assert search.live_beams == [before[p] + [t] for p, t in zip(step.parents, step.tokens)]
        assert step.done == search.done
    return search.finalize(), steps


def run_transformers(model, prompt, params):
    """-> (generated part of sequences, sequences_scores, number of steps)"""
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        out = _generate(model, prompt, params)
    finally:
        hook.remove()
    return out.sequences[:, len(prompt) :].tolist(), out.sequences_scores.tolist(), len(calls)


def _generate(model, prompt, params):
    return model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=MAX_NEW,
        do_sample=params.do_sample,
        temperature=params.temperature,
        top_k=params.top_k,
        num_beams=params.num_beams,
        num_return_sequences=params.num_return_sequences,
        length_penalty=params.length_penalty,
        early_stopping=params.early_stopping,
        repetition_penalty=params.repetition_penalty,
        no_repeat_ngram_size=params.no_repeat_ngram_size,
        min_new_tokens=params.min_new_tokens,
        eos_token_id=list(params.eos_token_ids),
        pad_token_id=PAD,
        return_dict_in_generate=True,
        output_scores=True,
    )


def assert_same(ours, theirs):
    (ours, our_steps), (sequences, scores, their_steps) = ours, theirs
    assert our_steps == their_steps
    assert len(ours) == len(sequences)
    width = len(sequences[0])
    assert width == max(len(h.token_ids) for h in ours)
    for hyp, seq, score in zip(ours, sequences, scores):
        assert hyp.token_ids + [PAD] * (width - len(hyp.token_ids)) == seq
        assert hyp.score == pytest.approx(score, abs=1e-4)


def eos_hit_by(model, prompt, params, steps) -> tuple[int, ...]:
    """Eos ids that this search really reaches: the tokens its best beam emits at `steps`
    when nothing ends it early. So the finished-hypothesis logic runs."""
    if not steps:
        return (NO_EOS,)
    sequences, _, _ = run_transformers(model, prompt, replace(params, eos_token_ids=(NO_EOS,)))
    assert NO_EOS not in sequences[0]
    return tuple(dict.fromkeys(sequences[0][s] for s in steps))


CASES = [
    # (num_beams, num_return_sequences, length_penalty, early_stopping, eos steps, extra params)
    (2, 1, 1.0, False, [2], {}),
    (2, 2, 1.0, True, [3], {}),
    (4, 1, 1.0, False, [3], {}),
    (4, 2, 0.5, True, [1], {}),
    (4, 2, 0.8, "never", [3], {}),  # "never" with length_penalty > 0: max-length heuristic
    (4, 2, 2.0, "never", [7], {}),  # long beams win here; eos only as the last token
    (4, 4, 1.0, False, [4], {}),
    (3, 2, -1.0, "never", [2], {}),
    (3, 3, 1.0, False, [1, 3], {}),  # two eos ids: 3 * num_beams candidates
    (4, 2, 1.0, False, [], {}),  # no eos hit: every hypothesis ends at max length
    # eos masked at step 3 by min_new_tokens, reachable at step 5
    (2, 2, 1.0, False, [3, 5], dict(repetition_penalty=1.3, no_repeat_ngram_size=2, min_new_tokens=4)),
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_beam_search_matches_transformers(model, case):
    num_beams, n, length_penalty, early_stopping, eos_steps, extra = case
    params = SamplingParams(
        num_beams=num_beams,
        num_return_sequences=n,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        pad_token_id=PAD,
        **extra,
    )
    returned_eos = []
    for prompt in PROMPTS:
        eos = eos_hit_by(model, prompt, params, eos_steps)
        prompt_params = replace(params, eos_token_ids=eos)
        ours = run_ours(model, prompt, prompt_params)
        assert_same(ours, run_transformers(model, prompt, prompt_params))
        returned_eos.append(any(h.token_ids[-1] in eos for h in ours[0]))
    # The case exercises what it claims: eos ends a returned hypothesis (for some prompt), or never.
    assert any(returned_eos) == bool(eos_steps)


@pytest.mark.parametrize("seed", [0, 1])
def test_beam_sampling_matches_transformers_with_the_same_rng(model, seed):
    """transformers draws its candidates with torch.multinomial from the global generator;
    fed a generator seeded the same, our draws are the same."""
    prompt = PROMPTS[0]
    params = SamplingParams(
        do_sample=True, temperature=0.8, top_k=30, num_beams=3, num_return_sequences=2,
        eos_token_ids=eos_hit_by(model, prompt, SamplingParams(num_beams=3), [2]), pad_token_id=PAD,
    )  # fmt: skip
    ours = run_ours(model, prompt, params, generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    assert_same(ours, run_transformers(model, prompt, params))


# ---- designed situations, on a bigram "model" -------------------------------------------------

BIGRAM_VOCAB = 12


def bigram_model(table: torch.Tensor):
    """A zero-layer Llama whose next-token logits after token i are table[i].

    One-hot embeddings (hidden size = vocab) go straight to the final RMSNorm, which
    scales them by s = 1 / sqrt(1/V + eps); lm_head = table.T / s undoes that."""
    vocab = table.shape[0]
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=vocab, intermediate_size=4, num_hidden_layers=0, num_attention_heads=1,
        num_key_value_heads=1, rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=0, eos_token_id=vocab - 1,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).eval()
    scale = 1.0 / (1.0 / vocab + config.rms_norm_eps) ** 0.5
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(vocab))
        model.lm_head.weight.copy_(table.T / scale)
    return model


def bigram_table(seed: int, eos_ids: list[int], eos_boost: float) -> torch.Tensor:
    table = torch.randn(BIGRAM_VOCAB, BIGRAM_VOCAB, generator=torch.Generator().manual_seed(seed)) * 1.5
    table[:, eos_ids] += eos_boost
    return table


def test_every_early_stopping_mode_when_all_beams_finish_early():
    """eos is likely everywhere, so B hypotheses finish within a few steps: True stops at
    once, False when no running beam can catch up at its current length, "never" (with
    length_penalty > 0) only when none could even at max length. Each run matches
    transformers, and over these tables the three rules stop at different steps."""
    eos = BIGRAM_VOCAB - 1
    runs = []
    for seed in (0, 2, 4):
        model = bigram_model(bigram_table(seed, [eos], 1.5))
        steps = {}
        for early_stopping in (True, False, "never"):
            params = SamplingParams(
                num_beams=2, num_return_sequences=2, early_stopping=early_stopping, length_penalty=1.0,
                eos_token_ids=(eos,), pad_token_id=PAD,
            )  # fmt: skip
            ours = run_ours(model, [0, 3], params)
            assert_same(ours, run_transformers(model, [0, 3], params))
            steps[early_stopping] = ours[1]
        assert steps[True] <= steps[False] <= steps["never"] <= MAX_NEW
        runs.append(steps)
    assert any(r[True] < r[False] for r in runs)
    assert any(r[False] < r["never"] for r in runs)


def test_eos_ids_crowding_every_candidate():
    """Two eos ids are every token's two favourites: with B = 2 the top 4 candidates are
    all eos, and only keeping (1 + #eos) * B = 6 candidates leaves beams to continue.
    "never" with length_penalty 2 keeps the search going to max length."""
    eos = [BIGRAM_VOCAB - 2, BIGRAM_VOCAB - 1]
    model = bigram_model(bigram_table(0, eos, 6.0))
    params = SamplingParams(
        num_beams=2, num_return_sequences=2, early_stopping="never", length_penalty=2.0,
        eos_token_ids=tuple(eos), pad_token_id=PAD,
    )  # fmt: skip
    ours = run_ours(model, [0, 3], params)
    assert_same(ours, run_transformers(model, [0, 3], params))
    assert ours[1] == MAX_NEW


def test_step_rejects_wrong_shapes_and_finished_search(model):
    search = BeamSearch(SamplingParams(num_beams=2, eos_token_ids=(2,)), PROMPTS[0], 1)
    with pytest.raises(ValueError):
        search.step(torch.zeros(2, 10))
    with pytest.raises(RuntimeError):
        search.finalize()
    search.step(next_logits(model, [PROMPTS[0]]))
    assert search.done and len(search.finalize()) == 1
    with pytest.raises(RuntimeError):
        search.step(torch.zeros(2, 10))
