"""Helpers shared by the engine's and the clients' tests."""

from __future__ import annotations

import asyncio
import time


async def wait_idle(engine, timeout: float = 10.0):
    """Poll an AsyncEngine's stats until no request runs or waits and no KV block is held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = engine.stats()
        if s.running == 0 and s.waiting == 0 and s.kv_blocks_used == 0:
            return s
        await asyncio.sleep(0.02)
    raise AssertionError(f"engine not idle: {engine.stats()}")


class RecordingStreamer:
    """transformers' streamer interface (put / end), recording what it is handed."""

    def __init__(self):
        self.puts: list[list] = []
        self.ended = 0

    def put(self, value):
        self.puts.append(value.tolist())

    def end(self):
        self.ended += 1
