"""AsyncTextGenerationClient gives what TextGenerationClient gives, errors and cancellation included."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from clients import AsyncTextGenerationClient, TextGenerationClient, TextGenerationError

PROMPT = "A short poem about rivers"


def test_async_client_matches_the_sync_client(tiny_server):
    with TextGenerationClient(tiny_server.target, timeout=60) as sync:
        expected = sync.generate(PROMPT, max_new_tokens=8, do_sample=True, seed=4, num_return_sequences=2)
        tokens = sync.tokenize(PROMPT, return_offsets=True)
        info = sync.model_info()

    async def main():
        async with AsyncTextGenerationClient(tiny_server.target, timeout=60) as client:
            options = {"max_new_tokens": 8, "do_sample": True, "seed": 4, "num_return_sequences": 2}
            result = await client.generate(PROMPT, **options)
            chunks = [chunk async for chunk in client.generate_stream(PROMPT, **options)]
            batch = await client.generate_batch([PROMPT, PROMPT], **options)
            return result, chunks, batch, await client.tokenize(PROMPT, return_offsets=True), await client.model_info()

    result, chunks, batch, got_tokens, got_info = asyncio.run(main())
    assert [s.token_ids for s in result.sequences] == [s.token_ids for s in expected.sequences]
    for index, seq in enumerate(expected.sequences):
        assert [t for c in chunks if c.index == index for t in c.token_ids] == seq.token_ids
    assert all([s.token_ids for s in r.sequences] == [s.token_ids for s in expected.sequences] for r in batch)
    assert (got_tokens, got_info) == (tokens, info)


def test_async_errors_carry_the_field(tiny_server):
    async def main():
        async with AsyncTextGenerationClient(tiny_server.target, timeout=60) as client:
            with pytest.raises(TextGenerationError) as unary:
                await client.generate(PROMPT, top_p=0.0, do_sample=True)
            with pytest.raises(TextGenerationError) as stream:
                async for _ in client.generate_stream(PROMPT, max_new_tokens=-1):
                    pass
            return unary.value, stream.value

    unary, stream = asyncio.run(main())
    assert (unary.code, unary.field_violations[0][0]) == (grpc.StatusCode.INVALID_ARGUMENT, "config.top_p")
    assert (stream.code, stream.field_violations[0][0]) == (grpc.StatusCode.INVALID_ARGUMENT, "config.max_new_tokens")


def test_leaving_an_async_stream_early_aborts_the_request(tiny_server):
    registry, model = tiny_server.server.metrics.registry, tiny_server.engine.info.model_id

    def counts():
        cancelled = registry.get_sample_value("textgen_request_errors_total", {"model": model, "code": "CANCELLED"})
        finished = registry.get_sample_value("textgen_requests_total", {"model": model, "finish_reason": "length"})
        return cancelled or 0.0, finished or 0.0

    async def main():
        async with AsyncTextGenerationClient(tiny_server.target, timeout=60) as client:
            stream = client.generate_stream(PROMPT, max_new_tokens=480, ignore_eos=True)
            async for _ in stream:
                break
            await stream.aclose()

    before = counts()
    asyncio.run(main())
    tiny_server.wait_idle(timeout=10)
    # The count is made on the server's event loop, which may run just after the engine went idle.
    for _ in range(100):
        if counts() != before:
            break
        time.sleep(0.05)
    # Aborted, not run to its 480th token: counted as cancelled, not as finished.
    assert counts() == (before[0] + 1, before[1])
