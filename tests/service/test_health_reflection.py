"""Standard services: grpc.health.v1 follows the engine, reflection describes the API."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from clients import TextGenerationClient, TextGenerationError
from service.options import build_parser
from service.server import TextGenServer
from tests.servers import BackgroundServer

SERVICE = "textgen.v1.TextGenerationService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def health(target: str, service: str = "") -> int:
    with grpc.insecure_channel(target) as channel:
        return (
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
        )


def test_health_is_serving_for_the_server_and_the_service(tiny_server):
    assert health(tiny_server.target) == SERVING
    assert health(tiny_server.target, SERVICE) == SERVING


def test_health_follows_the_engine(tiny_llama, monkeypatch):
    from engine import AsyncEngine

    engine = AsyncEngine.from_pretrained(tiny_llama, num_kv_blocks=64)
    server = BackgroundServer(engine)
    try:
        assert health(server.target) == SERVING
        # The engine reports itself unhealthy (a stuck or dead step loop): health follows within a poll.
        monkeypatch.setattr(AsyncEngine, "is_healthy", property(lambda self: False))
        _eventually(lambda: health(server.target) == NOT_SERVING and health(server.target, SERVICE) == NOT_SERVING)
        monkeypatch.undo()
        _eventually(lambda: health(server.target) == SERVING)
    finally:
        server.close()


def _eventually(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def _reflect(target: str, **request) -> reflection_pb2.ServerReflectionResponse:
    with grpc.insecure_channel(target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(**request)]), timeout=10)
        return next(iter(responses))


def test_reflection_lists_and_describes_the_service(tiny_server):
    listed = _reflect(tiny_server.target, list_services="")
    names = {s.name for s in listed.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names

    described = _reflect(tiny_server.target, file_containing_symbol=SERVICE)
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in described.file_descriptor_response.file_descriptor_proto
    ]
    service = next(s for f in files for s in f.service if s.name == "TextGenerationService")
    methods = {m.name: (m.input_type, m.output_type, m.server_streaming) for m in service.method}
    assert methods["Generate"] == (".textgen.v1.GenerateRequest", ".textgen.v1.GenerateResponse", False)
    assert methods["GenerateStream"] == (".textgen.v1.GenerateRequest", ".textgen.v1.GenerateStreamResponse", True)
    assert set(methods) == {"Generate", "GenerateStream", "Tokenize", "GetModelInfo"}


def test_health_is_not_serving_while_loading():
    """Before the model is loaded, health answers NOT_SERVING and generation UNAVAILABLE."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = TextGenServer(build_parser().parse_args(["--port", "0"]))  # load() is never called
    try:
        port = asyncio.run_coroutine_threadsafe(server.start(), loop).result(30)
        target = f"127.0.0.1:{port}"
        assert health(target) == NOT_SERVING and health(target, SERVICE) == NOT_SERVING
        with TextGenerationClient(target, timeout=10) as client, pytest.raises(TextGenerationError) as caught:
            client.generate("Hi")
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        asyncio.run_coroutine_threadsafe(server.drain(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
