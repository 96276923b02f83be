"""`python -m service` as an operator runs it: start-up logs, health, metrics, and a
SIGTERM that drains in-flight streams before the process exits."""

from __future__ import annotations

import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients import TextGenerationClient, TextGenerationError
from tests.parity import client_sequences, join_stream, same
from tests.reliability.helpers import wait_for

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, model, *args: str):
        self.log: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service", "--model", str(model), "--port", "0", *args],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        # A thread reads the output, so that waiting for a line that never comes times out
        # instead of blocking in readline() on a server that has gone quiet.
        self._lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        match = self.wait_for_line(r"listening on 127\.0\.0\.1:(\d+)")
        self.target = f"127.0.0.1:{match.group(1)}"

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)  # the output ended

    def wait_for_line(self, pattern: str, timeout: float = 120) -> re.Match:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                self._lines.put(None)  # for the next caller
                break
            self.log.append(line)
            if match := re.search(pattern, line):
                return match
        raise AssertionError(f"no line matching {pattern!r}; log:\n{''.join(self.log)}")

    def health(self) -> int:
        with grpc.insecure_channel(self.target) as channel:
            request = health_pb2.HealthCheckRequest(service="textgen.v1.TextGenerationService")
            return health_pb2_grpc.HealthStub(channel).Check(request, timeout=10).status

    def finish(self, timeout: float = 60) -> tuple[int, str]:
        self.proc.wait(timeout=timeout)
        self._reader.join(10)
        while (line := self._lines.get(timeout=10)) is not None:
            self.log.append(line)
        self._lines.put(None)
        return self.proc.returncode, "".join(self.log)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def metrics_port():
    return free_port()


def test_startup_health_metrics_and_drain(tiny_llama, metrics_port):
    server = ServerProcess(
        tiny_llama, "--metrics-port", str(metrics_port), "--num-kv-blocks", "64", "--drain-grace-s", "30"
    )
    try:
        # Loading is logged, and health turns SERVING only once the warm-up generation ran.
        server.wait_for_line(r"model loaded in")
        server.wait_for_line(r"warm-up generation took")
        server.wait_for_line(r"SERVING on")
        assert server.health() == health_pb2.HealthCheckResponse.SERVING

        with TextGenerationClient(server.target, timeout=60) as client:
            result = client.generate("Hello", max_new_tokens=4, request_id="my-request-1")
            assert result.request_id == "my-request-1" and result.usage.completion_tokens == 4
            with pytest.raises(TextGenerationError):
                client.generate("Hello", max_new_tokens=0)

            metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
            model = re.escape(str(tiny_llama))
            for series in (
                rf'textgen_requests_total{{finish_reason="length",model="{model}"}} [1-9]',
                rf'textgen_request_errors_total{{code="INVALID_ARGUMENT",model="{model}"}} 1\.0',
                rf'textgen_time_to_first_token_seconds_count{{model="{model}"}} [1-9]',
                rf'textgen_inter_token_latency_seconds_count{{model="{model}"}} [1-9]',
                rf'textgen_request_duration_seconds_count{{model="{model}"}} [1-9]',
                rf'textgen_requests_running{{model="{model}"}} 0\.0',
                rf'textgen_requests_waiting{{model="{model}"}} 0\.0',
                rf'textgen_kv_blocks_total{{model="{model}"}} 64\.0',
                rf'textgen_kv_cache_usage_ratio{{model="{model}"}} ',
                rf'textgen_preemptions_total{{model="{model}"}} ',
                rf'textgen_prefix_cache_queries_total{{model="{model}"}} [1-9]',
                rf'textgen_prefix_cache_hits_total{{model="{model}"}} ',
            ):
                assert re.search(series, metrics), f"{series} not in\n{metrics}"
            # The log names each request.
            server.wait_for_line(r"\[my-request-1\] done: length")

            # SIGTERM while a stream runs (500 tokens: a few seconds): health turns NOT_SERVING,
            # new calls are refused, the stream runs to its end, then the process exits cleanly.
            stream = client.generate_stream("Hello", max_new_tokens=500, ignore_eos=True)
            chunks = [next(stream)]
            server.proc.send_signal(signal.SIGTERM)
            server.wait_for_line(r"draining: NOT_SERVING, 1 calls in flight")
            assert server.health() == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(TextGenerationError) as caught:
                client.generate("Hello", max_new_tokens=2)
            assert caught.value.code == grpc.StatusCode.UNAVAILABLE
            chunks += list(stream)
        assert sum(len(c.token_ids) for c in chunks) == 500
        assert chunks[-1].finish_reason == "length"
        code, log = server.finish()
        assert code == 0, log
        assert "stopped" in log
    finally:
        server.kill()


def test_drain_grace_cuts_streams_that_run_too_long(tiny_llama):
    server = ServerProcess(tiny_llama, "--num-kv-blocks", "64", "--drain-grace-s", "0.5")
    try:
        server.wait_for_line(r"SERVING on")
        with TextGenerationClient(server.target, timeout=60) as client:
            stream = client.generate_stream("Hello", max_new_tokens=500, ignore_eos=True)
            next(stream)
            began = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            with pytest.raises(TextGenerationError):
                list(stream)
        code, log = server.finish()
        assert code == 0, log
        assert time.monotonic() - began < 10
    finally:
        server.kill()


def test_engine_process_streams_like_the_thread_and_its_child_ends_with_the_server(tiny_llama, tiny_server):
    # No --engine-process: a server steps its engine in a child process by default.
    server = ServerProcess(tiny_llama, "--num-kv-blocks", "64")
    try:
        # The child's records go through the server's own logging, marked as the engine process's.
        server.wait_for_line(r"engine\.factory: \[engine process\] KV cache: 64 blocks")
        # Both processes serve until they exit: each freezes its start-up objects out of the
        # garbage collector's full collections (engine.llm_engine.freeze_startup_objects).
        child = server.wait_for_line(r"\[engine process\] garbage collector: (\d+) objects alive after start-up")
        server.wait_for_line(r"SERVING on")
        parent = server.wait_for_line(r"llm_engine: garbage collector: (\d+) objects alive after start-up")
        assert int(child.group(1)) > 10_000 and int(parent.group(1)) > 10_000  # modules and the model, at least
        spawned = [p for p in psutil.Process(server.proc.pid).children() if "spawn_main" in " ".join(p.cmdline())]
        assert len(spawned) == 1
        options = dict(max_new_tokens=16, ignore_eos=True)
        with TextGenerationClient(server.target, timeout=60) as client:
            streamed = join_stream(client.generate_stream("Hello there", **options))
        with TextGenerationClient(tiny_server.target, timeout=60) as client:  # the step loop on a thread
            expected = client_sequences(client.generate("Hello there", **options).sequences)
        assert same(streamed, expected) and len(streamed[0]["token_ids"]) == 16
        server.proc.send_signal(signal.SIGTERM)
        code, log = server.finish()
        assert code == 0, log
        wait_for(lambda: not psutil.pid_exists(spawned[0].pid), timeout=10, what="the engine process gone")
    finally:
        server.kill()


def test_a_model_that_does_not_load_exits_non_zero(tmp_path):
    server = ServerProcess(tmp_path / "no-such-model")
    try:
        code, log = server.finish()
        assert code == 1
        assert "could not load the model" in log
    finally:
        server.kill()


def test_binds_loopback_by_default():
    from clients.channel import DEFAULT_TARGET
    from service.options import build_parser

    assert build_parser().parse_args([]).host == "127.0.0.1"
    assert DEFAULT_TARGET.startswith("127.0.0.1:")


def test_a_string_engine_option_reaches_the_engine_config_as_given():
    from service.options import build_parser, engine_options

    args = build_parser().parse_args(["--kv-cache-dtype", "fp8", "--max-num-seqs", "8"])
    assert engine_options(args) == {"kv_cache_dtype": "fp8", "max_num_seqs": 8}
