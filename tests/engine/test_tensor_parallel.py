"""Tensor parallelism on the CPU (gloo): 2 ranks must generate what 1 rank generates.

Tokens are compared exactly, log-probabilities within LOGPROB_ATOL. Splitting o_proj and
down_proj over ranks changes the summation order of their dot products (two partial
sums added by the all-reduce instead of one running sum), which moves fp32 logits of
these tiny models by ~1e-6; their greedy choices are far from ties (initializer_range
0.1, see tests/checkpoints.py), so no token may change. A wrong head, KV head or slice
moves logits by 1e-2 or more.

Each engine with tensor_parallel_size=2 starts one worker process (a few seconds), so
the engines are shared per module.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import time

import pytest
import torch

from engine import AsyncEngine, EngineDeadError, GenerationRequest, loader
from engine.parallel.shard_loader import load_shard
from engine.parallel.sharding import check_tensor_parallel, local_spec, shard_plan
from engine.parallel.tp_runtime import TensorParallelRuntime
from service.options import build_parser, engine_options
from tests.checkpoints import make_tiny_checkpoint
from tests.engine.paged_driver import Pager, Seq, step

LOGPROB_ATOL = 1e-4
# Blocks of 4 tokens and 16-token steps: prompts span several blocks, long prompts are
# prefilled in chunks, and chunks share steps with other requests' decodes.
OPTIONS = dict(dtype="float32", num_kv_blocks=160, block_size=4, max_num_batched_tokens=16)
PROMPTS = [[1, 2, 3, 4, 5], list(range(100, 137)), [9] * 20, list(range(40, 60))]


# ---- sharding rules, no processes --------------------------------------------------------
def test_kv_heads_split_replicate_or_refuse(tiny_llama):
    spec = loader.load_spec(tiny_llama)  # 4 q heads, 2 KV heads, intermediate 128
    split = [shard_plan(spec, r, 2) for r in range(2)]
    assert [(p.q_heads, p.kv_heads, p.kv_start) for p in split] == [(2, 1, 0), (2, 1, 1)]
    # 4 ranks, 2 KV heads: each KV head on the two ranks whose q heads read it.
    replicated = [shard_plan(spec, r, 4) for r in range(4)]
    assert [(p.q_heads, p.kv_heads, p.kv_start) for p in replicated] == [(1, 1, 0), (1, 1, 0), (1, 1, 1), (1, 1, 1)]
    mqa = dataclasses.replace(spec, num_key_value_heads=1)
    assert [shard_plan(mqa, r, 2).kv_start for r in range(2)] == [0, 0]
    assert local_spec(spec, 2).num_attention_heads == 2 and local_spec(spec, 2).intermediate_size == 64

    three_kv = dataclasses.replace(spec, num_attention_heads=6, num_key_value_heads=3)
    with pytest.raises(ValueError, match="tensor_parallel_size=2 cannot split the model's 3 KV heads"):
        check_tensor_parallel(three_kv, 2)
    with pytest.raises(ValueError, match="tensor_parallel_size=3 must divide the model's 4 attention heads"):
        check_tensor_parallel(spec, 3)
    with pytest.raises(ValueError, match="tensor_parallel_size=2 must divide the model's intermediate_size"):
        check_tensor_parallel(dataclasses.replace(spec, intermediate_size=129), 2)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_shards_reassemble_into_the_checkpoint(tiny_checkpoints, kind):
    folder = tiny_checkpoints[kind]
    spec = loader.load_spec(folder)
    full = loader.load_weights(folder, torch.float32)
    shards = [load_shard(folder, spec, r, 2, torch.float32) for r in range(2)]
    assert set(shards[0]) == set(full)
    for name, tensor in full.items():
        parts = [s[name] for s in shards]
        if any(p in name for p in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
            assert parts[0].shape[0] == tensor.shape[0] // 2, name  # heads / MLP columns, by rows
            assert torch.equal(torch.cat(parts, 0), tensor), name
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            assert torch.equal(torch.cat(parts, 1), tensor), name  # by input columns
        else:  # norms, embedding, lm_head: replicated
            assert all(torch.equal(p, tensor) for p in parts), name


def test_replicated_kv_head_is_the_one_the_ranks_q_heads_read(tiny_llama):
    spec = loader.load_spec(tiny_llama)
    name = "model.layers.0.self_attn.k_proj.weight"
    full = loader.load_weights(tiny_llama, torch.float32)[name]
    d = spec.head_dim
    for rank in range(4):  # q head r reads KV head r // 2
        shard = load_shard(tiny_llama, spec, rank, 4, torch.float32)[name]
        assert torch.equal(shard, full[(rank // 2) * d : (rank // 2 + 1) * d])


def test_the_flag_reaches_the_engine_config():
    args = build_parser().parse_args(["--tensor-parallel-size", "2"])
    assert engine_options(args)["tensor_parallel_size"] == 2


def test_an_unsplittable_size_is_refused_before_any_worker_starts(tiny_llama):
    with pytest.raises(ValueError, match="tensor_parallel_size=3"):
        AsyncEngine.from_pretrained(tiny_llama, tensor_parallel_size=3, **OPTIONS)


# ---- two ranks against one ---------------------------------------------------------------
def close(engine: AsyncEngine) -> None:
    asyncio.run(engine.shutdown())
    runtime = engine._loop.engine.runtime
    if hasattr(runtime, "close"):
        runtime.close()


def run(engine: AsyncEngine, prompts, **params) -> list[dict]:
    """Per prompt: {sequence index: (token ids, chosen-token logprobs, cumulative logprob)}."""

    async def one(prompt):
        request = GenerationRequest(prompt, engine.resolve_params(len(prompt), **params))
        seqs: dict[int, tuple[list, list, float]] = {}
        async for output in engine.generate(request):
            for s in output.sequences:
                tokens, logprobs, _ = seqs.setdefault(s.index, ([], [], 0.0))
                tokens.extend(s.token_ids)
                logprobs.extend(lp.logprob for lp in s.logprobs or ())
                seqs[s.index] = (tokens, logprobs, s.cumulative_logprob)
        return seqs

    async def main():
        return await asyncio.gather(*(one(p) for p in prompts))

    return asyncio.run(main())


def assert_same(ours: list[dict], reference: list[dict]) -> None:
    for got, want in zip(ours, reference, strict=True):
        assert got.keys() == want.keys()
        for index in want:
            assert got[index][0] == want[index][0]  # tokens: exactly
            assert got[index][1] == pytest.approx(want[index][1], abs=LOGPROB_ATOL)
            assert got[index][2] == pytest.approx(want[index][2], abs=LOGPROB_ATOL * len(want[index][0]))


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def one_and_two_ranks(request, tiny_checkpoints):
    folder = tiny_checkpoints[request.param]
    one = AsyncEngine.from_pretrained(folder, **OPTIONS)
    two = AsyncEngine.from_pretrained(folder, tensor_parallel_size=2, **OPTIONS)
    yield one, two
    close(one)
    close(two)


def test_two_ranks_generate_what_one_rank_generates(one_and_two_ranks):
    one, two = one_and_two_ranks
    params = dict(max_new_tokens=12, do_sample=False, logprobs=3)
    # All prompts at once: continuous batching mixes decodes with prefill chunks.
    assert_same(run(two, PROMPTS, **params), run(one, PROMPTS, **params))
    # Each rank caches only its own KV head (the tiny models have 2 KV heads: 1 a rank).
    local = two._loop.engine.runtime.local
    assert local.kv_cache.shape[-2] == 2 * 1


def test_beam_search_copies_blocks_on_every_rank(one_and_two_ranks):
    # Beams fork the prompt's last partial block (copy_blocks), which every rank must do
    # to its own KV heads, or the beams read another beam's cache.
    one, two = one_and_two_ranks
    params = dict(max_new_tokens=8, num_beams=3, num_return_sequences=2, do_sample=False)
    assert_same(run(two, PROMPTS[:2], **params), run(one, PROMPTS[:2], **params))


def test_mqa_replicates_the_kv_head(tmp_path):
    folder = make_tiny_checkpoint("llama", tmp_path / "mqa", num_key_value_heads=1)
    one = AsyncEngine.from_pretrained(folder, **OPTIONS)
    two = AsyncEngine.from_pretrained(folder, tensor_parallel_size=2, **OPTIONS)
    try:
        params = dict(max_new_tokens=12, do_sample=False, logprobs=3)
        assert_same(run(two, PROMPTS, **params), run(one, PROMPTS, **params))
        assert two._loop.engine.runtime.local.spec.num_key_value_heads == 1
    finally:
        close(one)
        close(two)


# ---- failures ----------------------------------------------------------------------------
def test_a_killed_worker_stops_the_engine_with_its_rank_named(tiny_llama):
    engine = AsyncEngine.from_pretrained(tiny_llama, tensor_parallel_size=2, **OPTIONS)
    pid = engine._loop.engine.runtime.worker_pids[1]
    request = GenerationRequest([1, 2, 3], engine.resolve_params(3, max_new_tokens=400, ignore_eos=True))

    async def main():
        seen = 0
        async for _ in engine.generate(request):
            seen += 1
            if seen == 3:  # mid-generation: the kill lands between steps or inside one
                os.kill(pid, signal.SIGKILL)

    started = time.monotonic()
    try:
        # The engine stopped under the request (UNAVAILABLE through gRPC), naming the rank.
        with pytest.raises(EngineDeadError, match="rank 1 worker process died"):
            asyncio.run(asyncio.wait_for(main(), timeout=30))
        # Reported at once, not after the collective timeout (60 s).
        assert time.monotonic() - started < 15
        assert not engine.is_healthy
        with pytest.raises(EngineDeadError, match="rank 1"):
            run(engine, [[1, 2, 3]], max_new_tokens=2)
    finally:
        close(engine)


def test_a_stuck_worker_fails_the_step_at_the_collective_timeout(tiny_llama):
    # SIGSTOP: the worker lives on but never joins the step's all-reduce. Without a
    # collective timeout rank 0 would wait forever.
    spec = loader.load_spec(tiny_llama)
    runtime = TensorParallelRuntime(tiny_llama, spec, 2, torch.float32, torch.device("cpu"), timeout_s=2.0)
    pid = runtime.worker_pids[1]
    try:
        runtime.init_kv_cache(16, 4)
        pager = Pager(16, 4)
        step(runtime, pager, [], [(Seq([1, 2, 3, 4, 5]), 5)])
        os.kill(pid, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(EngineDeadError, match="every worker still running.*[Tt]imed out"):
            step(runtime, pager, [], [(Seq([7, 8, 9]), 3)])
        assert time.monotonic() - started < 10
        with pytest.raises(EngineDeadError):  # and it stays dead
            step(runtime, pager, [], [(Seq([7, 8, 9]), 3)])
    finally:
        runtime.close()  # kills the stopped worker
