"""A load run with faults: N streaming clients against a real server for a fixed time.

    python -m tests.reliability.load_run --model PATH --clients 24 --seconds 15 \
        --warmup-seconds 5 --report report.json

Runs in a process of its own (so that its resident memory is the server's and its
clients', nothing else's): a TextGenServer on 127.0.0.1 around the given model, and
N asyncio clients, each on its own channel, each looping until the phase ends over a
fixed workload of greedy and seeded requests:

- 60% read their stream to the end: text, tokens and finish reason must equal the
  reference (the same request run alone before the load);
- 30% cancel after a random number of chunks; what they got must be a prefix of the
  reference;
- 10% set a deadline too short to finish; what they got before DEADLINE_EXCEEDED must
  be a prefix too (one that finishes in time anyway must be whole and equal).

A warm-up phase runs the same load first; the baseline (resident memory, the server's
asyncio tasks) is taken after it, once the server is idle, and compared with the same
figures after the main phase. The report (JSON) holds every count and measurement;
tests/reliability/test_load.py judges it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import statistics
import time
from dataclasses import dataclass, field

import grpc
import psutil

from clients import AsyncTextGenerationClient, TextGenerationClient, TextGenerationError
from tests.parity import join_stream
from tests.servers import BackgroundServer

# (prompt, options): greedy of several lengths, seeded sampling, two seeded samples, chat.
WORKLOAD = [
    ("The lighthouse keeper climbed the stairs", dict(max_new_tokens=48, ignore_eos=True)),
    ("Once upon a time", dict(max_new_tokens=16, ignore_eos=True)),
    ("Rivers run to the sea because " * 3, dict(max_new_tokens=64, ignore_eos=True)),
    ("A list of fruits: apple, pear,", dict(max_new_tokens=32)),
    ("The capital of France is", dict(max_new_tokens=8, ignore_eos=True)),
    ("Write a haiku about snow", dict(max_new_tokens=40, do_sample=True, seed=7, temperature=0.8, top_k=40)),
    ("In the beginning", dict(max_new_tokens=56, do_sample=True, seed=3, top_p=0.9, ignore_eos=True)),
    ("Two endings for one story:", dict(max_new_tokens=24, do_sample=True, seed=21, num_return_sequences=2)),
    ([{"role": "user", "content": "Tell me about whales."}], dict(max_new_tokens=40, ignore_eos=True)),
    ("Numbers: 1, 2, 3,", dict(max_new_tokens=64, repetition_penalty=1.2, ignore_eos=True)),
]
# Deadlines go to the long entries only, so that they are too short to finish.
LONG = [i for i, (_, options) in enumerate(WORKLOAD) if options["max_new_tokens"] >= 40]
CANCEL_SHARE, DEADLINE_SHARE = 0.30, 0.10
DEADLINE_RANGE_S = (0.005, 0.06)
MAX_REQUESTS_PER_CLIENT = 100_000  # a bound on each client's loop besides the clock


@dataclass
class Tally:
    completed: int = 0
    cancelled: int = 0
    deadline_exceeded: int = 0
    deadline_finished: int = 0  # a short deadline that was met after all (checked whole)
    chunks: int = 0
    tokens: int = 0
    mismatches: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    ttft_s: list = field(default_factory=list)
    duration_s: list = field(default_factory=list)


def is_prefix(got: list[dict], want: list[dict]) -> bool:
    by_index = {s["index"]: s for s in want}
    for seq in got:
        ref = by_index.get(seq["index"])
        if ref is None or ref["token_ids"][: len(seq["token_ids"])] != seq["token_ids"]:
            return False
        if not ref["text"].startswith(seq["text"]):
            return False
    return True


def strip(seqs: list[dict]) -> list[dict]:
    return [{k: s[k] for k in ("index", "token_ids", "text", "finish_reason")} for s in seqs]


async def one_request(client, rng: random.Random, references, tally: Tally) -> None:
    mode = rng.random()
    if mode < DEADLINE_SHARE:
        entry = rng.choice(LONG)
        timeout = rng.uniform(*DEADLINE_RANGE_S)
    else:
        entry = rng.randrange(len(WORKLOAD))
        timeout = 120.0
    prompt, options = WORKLOAD[entry]
    want = references[entry]
    cancel_after = None
    if DEADLINE_SHARE <= mode < DEADLINE_SHARE + CANCEL_SHARE:
        cancel_after = rng.randint(1, max(1, sum(len(s["token_ids"]) for s in want) - 1))
    chunks, began, first = [], time.monotonic(), None
    try:
        stream = client.generate_stream(prompt, timeout=timeout, **options)
        async for chunk in stream:
            first = first or time.monotonic()
            chunks.append(chunk)
            if cancel_after is not None and len(chunks) >= cancel_after:
                await stream.aclose()  # leaving early cancels the call
                break
    except TextGenerationError as error:
        got = join_stream(chunks)
        if error.code == grpc.StatusCode.DEADLINE_EXCEEDED and mode < DEADLINE_SHARE:
            tally.deadline_exceeded += 1
            if not is_prefix(got, want):
                tally.mismatches.append({"entry": entry, "mode": "deadline", "got": strip(got)})
        else:
            tally.unexpected.append({"entry": entry, "code": error.code.name, "message": error.message})
        return
    got = join_stream(chunks)
    tally.chunks += len(chunks)
    tally.tokens += sum(len(c.token_ids) for c in chunks)
    if cancel_after is not None and len(chunks) >= cancel_after and not all(s["finish_reason"] for s in got):
        tally.cancelled += 1
        if not is_prefix(got, want):
            tally.mismatches.append({"entry": entry, "mode": "cancel", "got": strip(got)})
        return
    if strip(got) != strip(want):
        tally.mismatches.append({"entry": entry, "mode": "complete", "got": strip(got), "want": strip(want)})
    if mode < DEADLINE_SHARE:
        tally.deadline_finished += 1
    else:
        tally.completed += 1
    if first is not None:
        tally.ttft_s.append(first - began)
    tally.duration_s.append(time.monotonic() - began)


async def run_phase(clients, seconds: float, seed: int, references) -> Tally:
    tally = Tally()
    stop_at = time.monotonic() + seconds

    async def client_loop(index: int, client) -> None:
        rng = random.Random(seed * 100_003 + index)
        for _ in range(MAX_REQUESTS_PER_CLIENT):
            if time.monotonic() >= stop_at:
                return
            await one_request(client, rng, references, tally)

    await asyncio.gather(*(client_loop(i, c) for i, c in enumerate(clients)))
    return tally


def server_snapshot(server: BackgroundServer) -> dict:
    async def tasks() -> int:
        return len(asyncio.all_tasks())  # this coroutine's own task included, each time alike

    stats = server.engine.stats()
    return {
        "tasks": server.run(tasks()),
        "in_flight": len(server.server.servicer.in_flight),
        "running": stats.running,
        "waiting": stats.waiting,
        "kv_blocks_used": stats.kv_blocks_used,
        "kv_blocks_total": stats.kv_blocks_total,
        "preemptions_total": stats.preemptions_total,
        "steps_total": stats.steps_total,
    }


def settle(server: BackgroundServer, baseline_tasks: int | None, timeout: float = 30.0) -> dict:
    """Wait for an idle engine (and the task count back at the baseline), collect garbage."""
    server.wait_idle(timeout)
    deadline = time.monotonic() + timeout
    snapshot = server_snapshot(server)
    while baseline_tasks is not None and snapshot["tasks"] > baseline_tasks and time.monotonic() < deadline:
        time.sleep(0.1)
        snapshot = server_snapshot(server)
    gc.collect()
    time.sleep(0.5)
    return snapshot


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def tally_report(tally: Tally, seconds: float) -> dict:
    return {
        "completed": tally.completed,
        "cancelled": tally.cancelled,
        "deadline_exceeded": tally.deadline_exceeded,
        "deadline_finished": tally.deadline_finished,
        "streams": tally.completed + tally.cancelled + tally.deadline_exceeded + tally.deadline_finished,
        "streams_per_s": round((tally.completed + tally.cancelled) / seconds, 1),
        "tokens_streamed": tally.tokens,
        "tokens_per_s": round(tally.tokens / seconds, 1),
        "mismatches": tally.mismatches[:10],
        "num_mismatches": len(tally.mismatches),
        "unexpected_errors": tally.unexpected[:10],
        "num_unexpected_errors": len(tally.unexpected),
        "ttft_p50_s": percentile(tally.ttft_s, 50),
        "ttft_p99_s": percentile(tally.ttft_s, 99),
        "duration_p50_s": percentile(tally.duration_s, 50),
        "duration_p99_s": percentile(tally.duration_s, 99),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--clients", type=int, default=24)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--warmup-seconds", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report", required=True)
    args = parser.parse_args(argv)

    from engine import AsyncEngine

    # Room for every client's longest request at once: no preemption (test_faults covers it).
    engine = AsyncEngine.from_pretrained(args.model, num_kv_blocks=max(64, args.clients * 8), block_size=16)
    server = BackgroundServer(engine)
    process = psutil.Process()
    try:
        with TextGenerationClient(server.target, timeout=120) as client:
            references = [join_stream(client.generate_stream(p, **o)) for p, o in WORKLOAD]

        async def load() -> dict:
            clients = [AsyncTextGenerationClient(server.target) for _ in range(args.clients)]
            try:
                began = time.monotonic()
                warm = await run_phase(clients, args.warmup_seconds, args.seed, references)
                warm_elapsed = time.monotonic() - began
                before = await asyncio.to_thread(settle, server, None)
                rss_before = process.memory_info().rss
                began = time.monotonic()
                main_tally = await run_phase(clients, args.seconds, args.seed + 1, references)
                elapsed = time.monotonic() - began
                after = await asyncio.to_thread(settle, server, before["tasks"])
                rss_after = process.memory_info().rss
            finally:
                await asyncio.gather(*(c.close() for c in clients))
            return {
                "clients": args.clients,
                "seconds": args.seconds,
                "warmup_seconds": args.warmup_seconds,
                "elapsed_s": round(elapsed, 1),
                "warmup": tally_report(warm, warm_elapsed),
                "main": tally_report(main_tally, elapsed),
                "before": before,
                "after": after,
                "rss_before_mib": round(rss_before / 2**20, 1),
                "rss_after_mib": round(rss_after / 2**20, 1),
                "rss_growth_pct": round(100.0 * (rss_after - rss_before) / rss_before, 2),
            }

        report = asyncio.run(load())
    finally:
        server.close()
    with open(args.report, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
