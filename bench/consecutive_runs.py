"""Batch-1 runs of the 7B shape back to back, each engine.step() timed (device only).

    python3 bench/consecutive_runs.py

Four runs of 128 tokens in and 256 out after an 8-token warm-up (garbage collection off
for the last two), then one more after 3 s idle: tok/s as bench/gpu_bench.py's
bench_ours counts it, the median step and the largest steps with their index. A step far
above the median marks a stall in the middle of decoding (a kernel compiled mid-run was
one, docs/benchmarks.md).
"""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gpu_bench as gb  # noqa: E402


def main() -> None:
    weights = gb.random_weights(gb.LLAMA2_7B)
    runtime, config, max_model_len = gb.make_runtime(gb.spec_for(gb.LLAMA2_7B), dict(weights))
    engine, _ = gb.make_engine(runtime, config, max_model_len, num_blocks=1000)
    del weights
    step, times = engine.step, []

    def timed():
        start = time.perf_counter()
        try:
            return step()
        finally:
            times.append(time.perf_counter() - start)

    engine.step = timed
    gb.run_offline(engine, gb.prompts_for(1, 128, 32000, seed=100), 8, max_model_len)  # warm-up
    for run in range(4):
        times.clear()
        if run == 2:
            gc.disable()
        elapsed, _ = gb.run_offline(engine, gb.prompts_for(1, 128, 32000, seed=101 + run), 256, max_model_len)
        largest = sorted(range(len(times)), key=lambda i: -times[i])[:6]
        print(f"run {run} (gc {'off' if run >= 2 else 'on'}): {256 / elapsed:.1f} tok/s, {len(times)} steps, "
              f"median step {sorted(times)[len(times) // 2] * 1e3:.2f} ms, largest: "
              + ", ".join(f"#{i} {times[i] * 1e3:.1f}" for i in largest))
    gc.enable()
    time.sleep(3)
    times.clear()
    elapsed, _ = gb.run_offline(engine, gb.prompts_for(1, 128, 32000, seed=200), 256, max_model_len)
    print(f"after 3 s idle: {256 / elapsed:.1f} tok/s, median step {sorted(times)[len(times) // 2] * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
