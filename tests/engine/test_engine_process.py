"""The step loop in a child process (EngineConfig.engine_process): the same tokens and the
same errors as the step-loop thread; a stuck, killed or orphaned child; shutdown.

A child costs seconds to start (it imports torch and loads the model), so most tests
share one per module and only the ones that stop or break a child start their own."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from engine import (
    AsyncEngine,
    ContextLengthError,
    EngineDeadError,
    FinishReason,
    GenerationRequest,
    InvalidParameterError,
    QueueFullError,
)
from tests.engine.helpers import RecordingStreamer, wait_idle
from tests.reliability.helpers import wait_for

ROOT = Path(__file__).resolve().parents[2]
# Small limits, so that the queue fills and the KV pool's check bites with small requests.
OPTIONS = dict(num_kv_blocks=64, block_size=4, max_num_seqs=4, max_waiting_requests=4)


@pytest.fixture(scope="module")
def engines(tiny_llama):
    """(process mode, thread mode) over the same checkpoint and limits."""
    process = AsyncEngine.from_pretrained(tiny_llama, engine_process=True, **OPTIONS)
    thread = AsyncEngine.from_pretrained(tiny_llama, **OPTIONS)
    yield process, thread
    for engine in (process, thread):
        asyncio.run(engine.shutdown())


def request(engine, prompt, rid=None, **params):
    return GenerationRequest(list(prompt), engine.resolve_params(len(prompt), **params), rid)


async def collect(engine, req):
    """Per sequence index: (token ids, text, finish reason, cumulative logprob, token logprobs); the last output."""
    sequences: dict[int, list] = {}
    outputs = [o async for o in engine.generate(req)]
    for output in outputs:
        for s in output.sequences:
            seq = sequences.setdefault(s.index, [[], "", None, 0.0, []])
            seq[0] += s.token_ids
            seq[1] += s.text
            seq[2], seq[3] = s.finish_reason, s.cumulative_logprob
            seq[4] += [(lp.token_id, lp.logprob, lp.top) for lp in s.logprobs or ()]
    return sequences, outputs[-1]


def close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-4 * max(1.0, abs(b))


CASES = {
    "greedy": dict(max_new_tokens=12, do_sample=False),
    "seeded sampling": dict(max_new_tokens=12, do_sample=True, temperature=0.8, top_k=50, top_p=0.95, seed=7),
    "two samples with logprobs": dict(max_new_tokens=8, do_sample=True, num_return_sequences=2, seed=3, logprobs=2),
    "beam search": dict(max_new_tokens=6, num_beams=2, num_return_sequences=2),
}
PROMPTS = [[1, 2, 3, 4, 5], list(range(100, 131)), [9] * 18]


@pytest.mark.parametrize("case", CASES)
def test_same_outputs_as_the_thread(engines, case):
    process, thread = engines
    params = CASES[case]

    async def run(engine):
        # Concurrent, so that a step's message carries several requests' outputs.
        return await asyncio.gather(*(collect(engine, request(engine, p, **params)) for p in PROMPTS))

    got, want = asyncio.run(run(process)), asyncio.run(run(thread))
    for (got_seqs, got_last), (want_seqs, want_last) in zip(got, want):
        assert sorted(got_seqs) == sorted(want_seqs)
        for index, (tokens, text, reason, cumulative, logprobs) in want_seqs.items():
            g_tokens, g_text, g_reason, g_cumulative, g_logprobs = got_seqs[index]
            assert (g_tokens, g_text, g_reason) == (tokens, text, reason) and len(tokens) > 0
            assert close(g_cumulative, cumulative)
            assert [t for t, _, _ in g_logprobs] == [t for t, _, _ in logprobs]
            assert all(close(g, w) for (_, g, _), (_, w, _) in zip(g_logprobs, logprobs))
        assert got_last.finished and got_last.error is None
        assert (got_last.prompt_tokens, got_last.completion_tokens) == (want_last.prompt_tokens,
                                                                       want_last.completion_tokens)
    assert "logprobs" not in case or all(seq[4] for seqs, _ in got for seq in seqs.values())


BAD = {
    "empty prompt": ([], dict(max_new_tokens=4), ("prompt", InvalidParameterError)),
    "token outside the vocabulary": ([1, 49152], dict(max_new_tokens=4), ("prompt", InvalidParameterError)),
    "prompt past the context": ([5] * 512, dict(max_new_tokens=4), ("prompt", ContextLengthError)),
    "more sequences than a step holds": ([1, 2], dict(max_new_tokens=4, do_sample=True, num_return_sequences=5),
                                         ("num_return_sequences", InvalidParameterError)),
    "more beams than a step holds": ([1, 2], dict(max_new_tokens=4, num_beams=5), ("num_beams", InvalidParameterError)),
    "more KV blocks than the pool": ([1, 2], dict(max_new_tokens=300), ("max_new_tokens", ContextLengthError)),
}

def test_generate_with_a_streamer_in_process_mode(engines):
    """The transformers-style model over a process-mode engine: the same tensor and the
    same streamer calls as over the thread."""
    import torch

    from engine.modeling import CausalLM

    calls = []
    for engine in engines:
        streamer = RecordingStreamer()
        out = CausalLM(engine).generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=6, min_new_tokens=6,
                                        do_sample=False, streamer=streamer)
        calls.append((out.tolist(), streamer.puts))
    assert calls[0] == calls[1] and len(calls[0][1]) == 7



@pytest.mark.parametrize("case", BAD)
def test_invalid_requests_are_refused_at_submit_naming_the_same_field(engines, case):
    prompt, params, (field, kind) = BAD[case]
    for engine in engines:
        # Params as for a fitting prompt: resolve_params checks the prompt's length itself.
        req = GenerationRequest(prompt, engine.resolve_params(2, **params))

        async def first(engine=engine, req=req):
            return await engine.generate(req, prompt_field="prompt").__anext__()

        with pytest.raises(kind) as caught:
            asyncio.run(first())
        assert type(caught.value) is kind and caught.value.field == field
    assert engines[0]._loop.num_in_flight == 0


def test_full_queue_and_duplicate_ids_are_refused_and_aborts_free_everything(engines):
    engine = engines[0]
    loop = engine._loop
    received: list = []
    long = dict(max_new_tokens=200, min_new_tokens=200)
    ids = [loop.submit(request(engine, [7, 8, 9 + i], rid=f"q{i}", **long), received.append) for i in range(7)]
    with pytest.raises(InvalidParameterError) as caught:
        loop.submit(request(engine, [1, 2, 3], rid="q0", **long), received.append)
    assert caught.value.field == "request_id"
    ids.append(loop.submit(request(engine, [1, 2, 3], **long), received.append))
    # Eight in flight (4 running + 4 waiting) and none can finish soon: the ninth is refused
    # at once, in the parent, without a round trip to the child.
    with pytest.raises(QueueFullError):
        loop.submit(request(engine, [1, 2, 3], **long), received.append)
    # Abort from other threads, twice each: idempotent.
    workers = [threading.Thread(target=lambda: [loop.abort(i) for i in ids + ids]) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    wait_for(lambda: loop.num_in_flight == 0, what="no request in flight")
    finals = [o for o in received if o.finished]
    assert sorted(o.request_id for o in finals) == sorted(ids)
    assert all(o.sequences[-1].finish_reason is FinishReason.ABORTED for o in finals)
    stats = asyncio.run(wait_idle(engine))
    assert stats.kv_blocks_free == stats.kv_blocks_total == 64 and stats.healthy


def test_a_consumer_that_walks_away_aborts_its_request(engines):
    engine = engines[0]

    async def main():
        stream = engine.generate(request(engine, [3, 1, 4, 1, 5], rid="walks-away", max_new_tokens=200,
                                         min_new_tokens=200))
        await stream.__anext__()
        assert engine.stats().kv_blocks_used > 0
        await stream.aclose()
        return await wait_idle(engine)

    assert asyncio.run(main()).kv_blocks_used == 0
    assert engine._loop.num_in_flight == 0


def test_a_stuck_child_turns_unhealthy_and_shutdown_aborts_and_reaps_it(tiny_llama):
    engine = AsyncEngine.from_pretrained(tiny_llama, engine_process=True, num_kv_blocks=64, block_size=16,
                                         max_num_seqs=1, watchdog_timeout_s=0.5)
    loop, pid = engine._loop, engine._loop.pid
    received: list[list] = [[], []]
    long = dict(max_new_tokens=500, min_new_tokens=500)
    for outputs in received:
        loop.submit(request(engine, [1, 2, 3, 4, 5], **long), outputs.append)
    wait_for(lambda: received[0], what="the first request's first output")
    assert (engine.stats().running, engine.stats().waiting) == (1, 1)  # max_num_seqs=1
    # A child that stops answering while requests are in flight: the watchdog, seen from
    # outside, answers the running and the waiting request with an error and refuses more.
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: not engine.is_healthy, timeout=5, what="unhealthy")
        assert not engine.stats().healthy
        wait_for(lambda: all(o[-1].finished for o in received), timeout=5, what="both requests answered")
        with pytest.raises(EngineDeadError, match="stalled"):
            loop.submit(request(engine, [1, 2], max_new_tokens=2), print)
    finally:
        os.kill(pid, signal.SIGCONT)
    for outputs in received:
        last = outputs[-1]
        assert last.engine_stopped and "stalled" in last.error
        assert last.sequences[-1].finish_reason is FinishReason.ERROR
    assert 0 < sum(len(s.token_ids) for o in received[0] for s in o.sequences) < 500
    answered = [len(o) for o in received]
    # Once it runs again the child aborts them (nothing more reaches their sinks) and serves.
    wait_for(lambda: engine.is_healthy, timeout=5, what="healthy again")
    wait_for(lambda: engine.stats().kv_blocks_used == 0 and engine.stats().running == 0, timeout=5,
             what="the answered requests aborted in the child")
    assert [len(o) for o in received] == answered
    later: list = []
    loop.submit(request(engine, [1, 2, 3, 4, 5], **long), later.append)
    wait_for(lambda: later, what="a new request's first output")
    # Shutdown aborts the running request, then ends the child.
    asyncio.run(engine.shutdown())
    assert later[-1].finished and later[-1].error is None
    assert later[-1].sequences[-1].finish_reason is FinishReason.ABORTED
    assert not psutil.pid_exists(pid)  # exited and reaped: no zombie
    with pytest.raises(EngineDeadError):
        loop.submit(request(engine, [1, 2], max_new_tokens=2), print)


def test_a_killed_child_fails_its_requests_and_the_engine(tiny_llama):
    engine = AsyncEngine.from_pretrained(tiny_llama, engine_process=True, num_kv_blocks=64, block_size=16)
    pid = engine._loop.pid

    async def stream_until_failure(stream):
        # The engine stopped under the request, which another engine may serve: not a
        # RequestFailedError (its own step failed).
        with pytest.raises(EngineDeadError) as caught:
            async for _ in stream:
                pass
        return str(caught.value)

    async def main():
        long = dict(max_new_tokens=400, min_new_tokens=400)
        streams = [engine.generate(request(engine, [2, 7, 1, 8 + i], **long)) for i in range(2)]
        for stream in streams:
            await stream.__anext__()
        os.kill(pid, signal.SIGKILL)
        return await asyncio.wait_for(asyncio.gather(*map(stream_until_failure, streams)), 30)

    for message in asyncio.run(main()):
        assert "the engine stopped: the engine process was killed by SIGKILL" in message
    assert not engine.is_healthy and not engine.stats().healthy
    assert engine._loop.num_in_flight == 0
    with pytest.raises(EngineDeadError):
        asyncio.run(engine.generate(request(engine, [1, 2], max_new_tokens=2)).__anext__())
    began = time.monotonic()
    asyncio.run(engine.shutdown())
    assert time.monotonic() - began < 2
    assert not psutil.pid_exists(pid)


def test_the_child_exits_when_its_parent_dies(tiny_llama):
    script = ("import sys, time\n"
              "from engine import AsyncEngine\n"
              "engine = AsyncEngine.from_pretrained(sys.argv[1], engine_process=True, num_kv_blocks=16)\n"
              "print(engine._loop.pid, flush=True)\n"
              "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", script, str(tiny_llama)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    try:
        child = int(parent.stdout.readline())
        assert psutil.pid_exists(child)
        parent.kill()
        parent.wait()
        # The child reads EOF on its pipe and stops (an orphan, reaped by init).
        wait_for(lambda: not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE,
                 timeout=15, what="the orphaned child gone")
    finally:
        parent.kill()
        parent.wait()


def test_a_child_that_cannot_build_its_engine_raises_its_error_here(tiny_llama):
    before = {p.pid for p in psutil.Process().children()}
    # The FP8 KV cache needs CUDA: the child's build (engine/factory.py) refuses it.
    with pytest.raises(ValueError, match="kv_cache_dtype: 'fp8' needs the CUDA runtime") as caught:
        AsyncEngine.from_pretrained(tiny_llama, engine_process=True, kv_cache_dtype="fp8", device="cpu")
    assert "in the engine process" in str(caught.value.__cause__)
    # The child is gone and reaped (multiprocessing's resource tracker may stay, as it does).
    left = [p for p in psutil.Process().children() if p.pid not in before]
    assert [p for p in left if "resource_tracker" not in " ".join(p.cmdline())] == []


def test_the_childs_logs_reach_the_parents_handlers(tiny_llama, caplog):
    """The child's records go through the parent's logging (here pytest's handler), marked
    as the engine process's, with the level the parent had when it started the child;
    a build that fails is logged there too, traceback included."""
    caplog.set_level(logging.INFO)
    engine = AsyncEngine.from_pretrained(tiny_llama, engine_process=True, num_kv_blocks=64, block_size=16)
    try:
        def from_child():
            return [r for r in caplog.records if r.getMessage().startswith("[engine process] ")]

        wait_for(from_child, timeout=10, what="a record from the child")
        assert all(r.processName == "textgen-engine" for r in from_child())
        assert any(r.name == "engine.factory" and "KV cache" in r.getMessage() for r in from_child())
    finally:
        asyncio.run(engine.shutdown())
    caplog.clear()
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        AsyncEngine.from_pretrained(tiny_llama, engine_process=True, kv_cache_dtype="fp8", device="cpu")
    def failure():
        return [r for r in caplog.records if "could not build the engine" in r.getMessage()]

    wait_for(failure, timeout=10, what="the child's record of its failed build")  # relayed by a thread
    assert "Traceback" in failure()[0].getMessage() and failure()[0].levelno == logging.ERROR


def test_tensor_parallel_is_refused_in_process_mode():
    from engine.config import EngineConfig

    with pytest.raises(ValueError, match="engine_process cannot be combined with tensor_parallel_size > 1"):
        EngineConfig(engine_process=True, tensor_parallel_size=2)
