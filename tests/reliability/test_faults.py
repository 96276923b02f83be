"""Faults inside the engine, seen from gRPC clients: a model step that raises, a step loop
that dies, a step loop that hangs (the watchdog), and a KV pool too small for the load.

Faults are injected into a server's own engine: its runtime's execute is wrapped (the
model raises, or blocks until released, for a batch whose prefill holds MARKER), or its
scheduler made to raise (a bug in engine state, which kills the step loop).
"""

from __future__ import annotations

import concurrent.futures
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients import TextGenerationClient, TextGenerationError
from tests.parity import client_sequences, join_stream, same
from tests.reliability.helpers import wait_for
from tests.servers import BackgroundServer

MARKER = 4242  # a token id no other prompt here holds
FAULTY_PROMPT = [1, 300, MARKER, 301]
PROMPTS = ["The lighthouse keeper", "Once upon a time in a quiet town", "Rivers run to the sea because"]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def health(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def step_loop(engine):
    """The AsyncEngine's step loop (engine.engine_loop.EngineLoop): where faults are injected."""
    return engine._loop


class MarkedExecute:
    """Wraps runtime.execute: a batch whose prefill holds MARKER waits for release(), then
    raises (fail=True) or runs normally (fail=False)."""

    def __init__(self, runtime, fail: bool):
        self._execute = runtime.execute
        self._fail = fail
        self.seen = threading.Event()
        self._release = threading.Event()
        runtime.execute = self

    def __call__(self, batch):
        if (batch.input_ids[batch.num_decodes :] == MARKER).any():
            self.seen.set()
            self._release.wait(30)
            if self._fail:
                raise RuntimeError("injected fault")
        return self._execute(batch)

    def release(self) -> None:
        self._release.set()


@pytest.fixture
def make_server(tiny_llama):
    servers = []

    def make(**options) -> BackgroundServer:
        from engine import AsyncEngine

        server = BackgroundServer(AsyncEngine.from_pretrained(tiny_llama, **options))
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


@pytest.fixture(scope="module")
def small_pool_server(tiny_llama):
    from engine import AsyncEngine

    server = BackgroundServer(AsyncEngine.from_pretrained(tiny_llama, num_kv_blocks=16, block_size=16, max_num_seqs=8))
    yield server
    server.close()


def reference(tiny_server, prompt, **options) -> list[dict]:
    with TextGenerationClient(tiny_server.target, timeout=60) as client:
        return client_sequences(client.generate(prompt, **options).sequences)


def test_a_failed_model_step_fails_only_its_own_requests(tiny_server, make_server):
    options = dict(max_new_tokens=24, ignore_eos=True)
    expected = [reference(tiny_server, p, **options) for p in PROMPTS]
    server = make_server(num_kv_blocks=128, max_num_seqs=8)
    assert all(MARKER not in server.engine.tokenizer.encode(p) for p in PROMPTS)
    fault = MarkedExecute(step_loop(server.engine).engine.runtime, fail=True)
    with TextGenerationClient(server.target, timeout=60) as client, concurrent.futures.ThreadPoolExecutor(8) as pool:
        # A request that is decoding when the faulty prefill joins its step: it shares the step's fate.
        neighbour = client.generate_stream(PROMPTS[0], max_new_tokens=400, ignore_eos=True)
        next(neighbour)
        faulty = pool.submit(lambda: list(client.generate_stream(FAULTY_PROMPT, max_new_tokens=8)))
        assert fault.seen.wait(30)
        # Requests that arrive while the faulty step runs are not part of it: they must finish.
        others = [pool.submit(lambda p=p: join_stream(client.generate_stream(p, **options))) for p in PROMPTS]
        # The step loop is held inside the faulty step, so they stay queued until it fails.
        wait_for(lambda: server.engine.stats().waiting == 3, what="three requests queued")
        fault.release()

        with pytest.raises(TextGenerationError) as caught:
            faulty.result(60)
        assert caught.value.code == grpc.StatusCode.INTERNAL
        assert caught.value.message == "generation failed: model step failed: RuntimeError('injected fault')"
        with pytest.raises(TextGenerationError) as caught:
            list(neighbour)
        assert caught.value.code == grpc.StatusCode.INTERNAL and "injected fault" in caught.value.message
        for future, want in zip(others, expected):
            assert same(future.result(60), want)
        # The engine goes on: empty, healthy, serving.
        server.wait_idle()
        assert server.engine.is_healthy and health(server.target) == SERVING
        assert same(client_sequences(client.generate(PROMPTS[1], **options).sequences), expected[1])
    registry, model = server.server.metrics.registry, server.engine.info.model_id
    assert registry.get_sample_value("textgen_request_errors_total", {"model": model, "code": "INTERNAL"}) == 2


def test_a_dead_step_loop_turns_health_not_serving_and_new_calls_unavailable(make_server):
    server = make_server(num_kv_blocks=64)
    loop = step_loop(server.engine)
    with TextGenerationClient(server.target, timeout=60) as client:
        running = client.generate_stream(PROMPTS[0], max_new_tokens=400, ignore_eos=True)
        next(running)

        def broken_schedule():
            raise RuntimeError("scheduler state is corrupt")

        loop.engine.scheduler.schedule = broken_schedule  # outside a model step: the loop cannot go on
        # The request in flight ends with a clear error instead of waiting forever:
        # UNAVAILABLE, as new calls get, since the server and not the request has failed.
        with pytest.raises(TextGenerationError) as caught:
            list(running)
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE
        assert "the engine stopped: RuntimeError('scheduler state is corrupt')" in caught.value.message
        assert loop.dead_reason is not None
        wait_for(lambda: health(server.target) == NOT_SERVING, timeout=5, what="health NOT_SERVING")
        for call in (
            lambda: client.generate(PROMPTS[1], max_new_tokens=4),
            lambda: list(client.generate_stream(PROMPTS[1], max_new_tokens=4)),
        ):
            began = time.monotonic()
            with pytest.raises(TextGenerationError) as caught:
                call()
            assert caught.value.code == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - began < 1.0


def test_the_watchdog_notices_a_step_that_never_returns(make_server):
    server = make_server(num_kv_blocks=64, watchdog_timeout_s=0.5)
    hang = MarkedExecute(step_loop(server.engine).engine.runtime, fail=False)
    with TextGenerationClient(server.target, timeout=60) as client, concurrent.futures.ThreadPoolExecutor(2) as pool:
        # Idle for longer than the watchdog's timeout first: that alone is not "stuck".
        time.sleep(0.8)
        assert client.generate(PROMPTS[0], max_new_tokens=4).usage.completion_tokens == 4
        assert health(server.target) == SERVING

        began = time.monotonic()
        stuck = pool.submit(lambda: client.generate(FAULTY_PROMPT, max_new_tokens=4))
        assert hang.seen.wait(30)
        wait_for(lambda: health(server.target) == NOT_SERVING, timeout=5, what="health NOT_SERVING")
        assert not server.engine.is_healthy
        # The call in flight is answered once the watchdog trips, UNAVAILABLE (another
        # replica may serve it), rather than left to wait for its deadline (60 s here).
        with pytest.raises(TextGenerationError) as caught:
            stuck.result(10)
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE and "stalled" in caught.value.message
        assert time.monotonic() - began < 10
        # New calls are refused at once rather than queued behind the stuck step.
        began = time.monotonic()
        with pytest.raises(TextGenerationError) as caught:
            client.generate(PROMPTS[1], max_new_tokens=4)
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - began < 1.0

        # The step returns after all: the answered request is aborted (its KV blocks come
        # back), the engine serves again and health follows.
        hang.release()
        wait_for(lambda: health(server.target) == SERVING, timeout=5, what="health SERVING again")
        wait_for(lambda: server.engine.stats().kv_blocks_used == 0, timeout=5, what="every KV block back")
        assert server.engine.stats().running == 0 and step_loop(server.engine).num_in_flight == 0
        assert client.generate(PROMPTS[1], max_new_tokens=4).usage.completion_tokens == 4


def test_a_tiny_kv_pool_preempts_and_still_finishes_everything_exactly(tiny_server, small_pool_server):
    # 16 blocks of 16 tokens: 8 requests of up to 80 tokens each need about 40.
    cases = [(p + " " + "again " * i, dict(max_new_tokens=48, ignore_eos=True)) for i, p in enumerate(PROMPTS * 2)]
    cases += [(PROMPTS[0], dict(max_new_tokens=40, do_sample=True, seed=11, num_return_sequences=2))]
    cases += [(PROMPTS[2], dict(max_new_tokens=40, do_sample=True, seed=5, top_k=20, temperature=0.8))]
    expected = [reference(tiny_server, p, **o) for p, o in cases]
    server = small_pool_server
    before = server.engine.stats().preemptions_total
    with TextGenerationClient(server.target, timeout=120) as client, concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(lambda p=p, o=o: join_stream(client.generate_stream(p, **o))) for p, o in cases]
        for future, want in zip(futures, expected):
            assert same(future.result(120), want)
    stats = server.wait_idle()
    assert stats.preemptions_total > before, "the pool was meant to run out"


@pytest.mark.parametrize(
    "options, code, field",
    [
        # One sequence longer than the whole pool.
        (dict(max_new_tokens=300), grpc.StatusCode.OUT_OF_RANGE, "config.max_new_tokens"),
        # Four sequences that fit one by one, not together.
        (dict(max_new_tokens=70, do_sample=True, num_return_sequences=4), grpc.StatusCode.OUT_OF_RANGE,
         "config.max_new_tokens"),
        # More sequences than one step may run: it could never be scheduled.
        (dict(max_new_tokens=2, num_beams=12), grpc.StatusCode.INVALID_ARGUMENT, "config.num_beams"),
        (dict(max_new_tokens=2, do_sample=True, num_return_sequences=9), grpc.StatusCode.INVALID_ARGUMENT,
         "config.num_return_sequences"),
    ],
    ids=["longer than the pool", "samples over the pool", "beams over max_num_seqs", "samples over max_num_seqs"],
)  # fmt: skip
def test_a_request_that_can_never_fit_is_refused_at_once(small_pool_server, options, code, field):
    server = small_pool_server
    with TextGenerationClient(server.target, timeout=30) as client:
        began = time.monotonic()
        with pytest.raises(TextGenerationError) as caught:
            client.generate(PROMPTS[0], **options)
        assert time.monotonic() - began < 1.0
        assert (caught.value.code, [f for f, _ in caught.value.field_violations]) == (code, [field])
        server.wait_idle()
        assert client.generate(PROMPTS[0], max_new_tokens=4).usage.completion_tokens == 4
