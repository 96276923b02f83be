"""AsyncEngine on a real (tiny) model: in-flight batching, preemption, abort, prefix reuse."""

from __future__ import annotations

import asyncio
import time

import pytest

from engine import AsyncEngine, FinishReason, GenerationRequest, QueueFullError
from tests.engine.helpers import wait_idle


def greedy_request(engine, prompt, n, rid=None):
    return GenerationRequest(prompt, engine.resolve_params(len(prompt), max_new_tokens=n, do_sample=False), rid)


async def collect(engine, request, delay=0.0):
    await asyncio.sleep(delay)
    outputs = [o async for o in engine.generate(request)]
    tokens = [t for o in outputs for s in o.sequences for t in s.token_ids]
    return tokens, outputs[-1]


PROMPTS = [[1, 2, 3, 4, 5], list(range(100, 137)), [9] * 20, list(range(500, 503)), list(range(40, 90))]


@pytest.fixture(scope="module")
def alone(tiny_llama):
    engine = AsyncEngine.from_pretrained(tiny_llama, num_kv_blocks=128, block_size=4)

    async def main():
        return [(await collect(engine, greedy_request(engine, p, 16)))[0] for p in PROMPTS]

    try:
        return asyncio.run(main())
    finally:
        asyncio.run(engine.shutdown())


@pytest.mark.parametrize("blocks", [128, 20])  # 20 blocks of 4 tokens forces preemption
def test_requests_joining_at_different_steps_match_each_alone(tiny_llama, alone, blocks):
    engine = AsyncEngine.from_pretrained(tiny_llama, num_kv_blocks=blocks, block_size=4)

    async def main():
        jobs = [collect(engine, greedy_request(engine, p, 16), delay=0.01 * i) for i, p in enumerate(PROMPTS)]
        results = await asyncio.gather(*jobs)
        stats = await wait_idle(engine)
        return results, stats

    results, stats = asyncio.run(main())
    assert [tokens for tokens, _ in results] == alone
    if blocks == 20:
        assert stats.preemptions_total > 0
    assert stats.kv_blocks_free == stats.kv_blocks_total
    asyncio.run(engine.shutdown())


def test_abort_and_early_close_return_every_block(tiny_llama):
    engine = AsyncEngine.from_pretrained(tiny_llama, num_kv_blocks=128, block_size=4)

    async def main():
        request = greedy_request(engine, PROMPTS[1], 200, rid="long")
        stream = engine.generate(request)
        await stream.__anext__()
        assert engine.stats().kv_blocks_used > 0
        await stream.aclose()  # a consumer that walks away aborts its request
        await wait_idle(engine)

        other = asyncio.ensure_future(collect(engine, greedy_request(engine, PROMPTS[2], 200, rid="x")))
        await asyncio.sleep(0.05)
        engine.abort("x")
        _, final = await other
        assert final.sequences[-1].finish_reason is FinishReason.ABORTED
        return await wait_idle(engine)

    stats = asyncio.run(main())
    assert stats.kv_blocks_used == 0
    asyncio.run(engine.shutdown())


def test_repeated_prompt_reports_prefix_hits_and_same_tokens(tiny_llama):
    engine = AsyncEngine.from_pretrained(tiny_llama, num_kv_blocks=128, block_size=4)
    prompt = PROMPTS[4]

    async def main():
        first = await collect(engine, greedy_request(engine, prompt, 8))
        second = await collect(engine, greedy_request(engine, prompt, 8))
        return first, second

    (t1, o1), (t2, o2) = asyncio.run(main())
    assert t1 == t2
    assert o1.cached_tokens == 0 and o2.cached_tokens == 48
    assert engine.stats().prefix_cache_hits_total == 48
    asyncio.run(engine.shutdown())


def test_full_queue_is_refused_quickly(tiny_llama):
    engine = AsyncEngine.from_pretrained(tiny_llama, num_kv_blocks=256, block_size=4, max_num_seqs=1, max_waiting_requests=2)

    async def main():
        # Long enough that none can finish before the fourth call (400 tokens each, one at a time).
        admitted = [asyncio.ensure_future(collect(engine, greedy_request(engine, PROMPTS[0], 400))) for _ in range(3)]
        while engine.stats().waiting < 2:  # all three are submitted; one runs, two wait
            await asyncio.sleep(0.001)
        started = time.monotonic()
        with pytest.raises(QueueFullError):
            await engine.generate(greedy_request(engine, PROMPTS[0], 5)).__anext__()
        elapsed = time.monotonic() - started
        results = await asyncio.gather(*admitted)  # the admitted calls still finish
        assert all(len(tokens) == 400 for tokens, _ in results)
        await wait_idle(engine)
        return elapsed

    assert asyncio.run(main()) < 0.1
    asyncio.run(engine.shutdown())
