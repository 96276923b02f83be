"""Fixtures for tests of the gRPC service and clients: real servers on real ports.

A server runs in this process, on an event loop in a background thread, around an
AsyncEngine the test can also call directly: that gives "same request, in process"
answers and engine.stats() (KV blocks) to check the server against. Tests of the
command line itself start `python -m service` as a subprocess (tests/service/test_cli_server.py).
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

# Registered for every test directory by tests/conftest.py, so the engine and the
# service are imported inside the fixtures: engine-only runs need no stubs.


class BackgroundServer:
    """TextGenServer on 127.0.0.1:<free port>, served by an event loop in a daemon thread."""

    def __init__(self, engine, *args: str, shares_engine: bool = False):
        """args: `python -m service` flags. shares_engine: the engine serves other servers too,
        so close() leaves it running."""
        from service.options import build_parser
        from service.server import TextGenServer

        self.engine = engine
        self._shares_engine = shares_engine
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-grpc-server", daemon=True)
        self._thread.start()
        options = build_parser().parse_args(["--port", "0", "--drain-grace-s", "2", *args])
        self.server = TextGenServer(options, engine=engine)
        port = self.run(self.server.start())
        self.run(self.server.load())
        self.target = f"127.0.0.1:{port}"

    def run(self, coro, timeout: float = 300):
        """Run a coroutine on the server's loop (engine.generate must run there too) and wait."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def engine_outputs(self, request):
        """The engine's own RequestOutputs for a GenerationRequest, bypassing gRPC."""

        async def collect():
            return [output async for output in self.engine.generate(request)]

        return self.run(collect())

    def wait_idle(self, timeout: float = 20.0):
        """Poll engine stats until no request runs or waits and no KV block is held."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.engine.stats()
            if stats.running == 0 and stats.waiting == 0 and stats.kv_blocks_used == 0:
                return stats
            if time.monotonic() > deadline:
                raise AssertionError(f"engine still busy after {timeout} s: {stats}")
            time.sleep(0.02)

    def close(self) -> None:
        self.run(self.server.drain())
        if not self._shares_engine:
            self.run(self.engine.shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@pytest.fixture(scope="session")
def tiny_server(tiny_llama):
    from engine import AsyncEngine

    # A small KV pool: cheap to allocate, still room for 16 concurrent streams.
    engine = AsyncEngine.from_pretrained(tiny_llama, num_kv_blocks=512, block_size=16)
    server = BackgroundServer(engine)
    yield server
    server.close()


@pytest.fixture(scope="session")
def default_server(default_model_folder):
    # default_model_folder (tests/conftest.py) converts the GGUF once per session and points
    # TEXTGEN_CACHE_DIR at it, so "default" here and in example subprocesses reuses it.
    from engine import AsyncEngine

    engine = AsyncEngine.from_pretrained("default", num_kv_blocks=1024, block_size=16)
    server = BackgroundServer(engine)
    yield server
    server.close()
