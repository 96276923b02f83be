"""Sizes of the reliability suites (CI-sized under `make test`, heavy under `make soak` / `make fuzz`), and polling.

TEXTGEN_SOAK=1 runs the load test at soak size; TEXTGEN_FUZZ_EXAMPLES=N sets the fuzz's
case count. Each can also be given its own figure (see LoadScale.from_env).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class LoadScale:
    clients: int
    seconds: float
    warmup_seconds: float

    @classmethod
    def from_env(cls) -> LoadScale:
        soak = os.environ.get("TEXTGEN_SOAK") == "1"
        base = cls(256, 60.0, 15.0) if soak else cls(24, 15.0, 5.0)
        return cls(
            int(os.environ.get("TEXTGEN_LOAD_CLIENTS", base.clients)),
            float(os.environ.get("TEXTGEN_LOAD_SECONDS", base.seconds)),
            float(os.environ.get("TEXTGEN_LOAD_WARMUP_SECONDS", base.warmup_seconds)),
        )


def fuzz_examples() -> int:
    return int(os.environ.get("TEXTGEN_FUZZ_EXAMPLES", "2000"))


def wait_for(condition, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    """Poll until condition() is truthy (returned), at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout} s")
        time.sleep(interval)
