"""A client that cancels, disconnects or passes its deadline aborts its request, and its
KV blocks come back. Runs on the default model, whose 1000 tokens would take far longer
than the waits below: a request that is freed in time was aborted, not finished."""

from __future__ import annotations

import time

import grpc
import pytest

from clients import TextGenerationClient, TextGenerationError
from clients.textgen.v1 import generate_pb2, generation_config_pb2, text_generation_service_pb2_grpc

LONG = dict(max_new_tokens=1000, ignore_eos=True)
PROMPT = "Tell me a very long story about a lighthouse keeper."


def cancelled_count(server) -> float:
    labels = {"model": server.engine.info.model_id, "code": "CANCELLED"}
    return server.server.metrics.registry.get_sample_value("textgen_request_errors_total", labels) or 0.0


def finished_count(server) -> float:
    labels = {"model": server.engine.info.model_id, "finish_reason": "length"}
    return server.server.metrics.registry.get_sample_value("textgen_requests_total", labels) or 0.0


@pytest.fixture
def server(default_server):
    default_server.wait_idle()
    before = (cancelled_count(default_server), finished_count(default_server))
    yield default_server
    # The count is made on the server's event loop, which may run just after the engine went idle.
    for _ in range(100):
        if (cancelled_count(default_server), finished_count(default_server)) != before:
            break
        time.sleep(0.05)
    # Every test here ends one request early: counted as cancelled, never as finished.
    assert (cancelled_count(default_server), finished_count(default_server)) == (before[0] + 1, before[1])


def test_cancelled_stream_frees_its_blocks(server):
    with TextGenerationClient(server.target) as client:
        stream = client.generate_stream(PROMPT, **LONG)
        for _ in zip(range(3), stream):
            pass
        assert server.engine.stats().kv_blocks_used > 0
        stream.close()  # leaving the loop cancels the call
        server.wait_idle(timeout=10)


def test_disconnected_client_frees_its_blocks(server):
    channel = grpc.insecure_channel(server.target)
    stub = text_generation_service_pb2_grpc.TextGenerationServiceStub(channel)
    config = generation_config_pb2.GenerationConfig(max_new_tokens=1000, ignore_eos=True)
    stream = stub.GenerateStream(generate_pb2.GenerateRequest(text=PROMPT, config=config))
    next(stream)
    channel.close()  # the connection goes away mid-stream
    server.wait_idle(timeout=10)


def test_passed_deadline_frees_its_blocks(server):
    with TextGenerationClient(server.target) as client, pytest.raises(TextGenerationError) as caught:
        client.generate(PROMPT, timeout=1.0, **LONG)
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    server.wait_idle(timeout=10)


def test_passed_deadline_of_a_stream_frees_its_blocks(server):
    with TextGenerationClient(server.target) as client, pytest.raises(TextGenerationError) as caught:
        for _ in client.generate_stream(PROMPT, timeout=1.0, **LONG):
            pass
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    server.wait_idle(timeout=10)
