"""Load with faults: concurrent streaming clients, 30% cancelling mid-stream, 10% with
deadlines too short to finish, against a real server for a fixed time (see load_run.py).

CI size under `make test`: 24 clients for 15 s (after a 5 s warm-up) on the tiny model.
`make soak` (TEXTGEN_SOAK=1): 256 clients for 60 s (after 15 s).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.reliability.helpers import LoadScale

ROOT = Path(__file__).resolve().parents[2]
RSS_GROWTH_LIMIT_PCT = 5.0


def test_streams_under_load_with_cancellations_and_deadlines(tiny_llama, tmp_path):
    scale = LoadScale.from_env()
    report_path = tmp_path / "load-report.json"
    command = [
        sys.executable, "-m", "tests.reliability.load_run", "--model", str(tiny_llama),
        "--clients", str(scale.clients), "--seconds", str(scale.seconds),
        "--warmup-seconds", str(scale.warmup_seconds), "--report", str(report_path),
    ]  # fmt: skip
    budget = scale.seconds + scale.warmup_seconds + 180
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=budget)
    assert done.returncode == 0, done.stderr[-5000:]
    report = json.loads(report_path.read_text())
    print(json.dumps(report, indent=2))
    main = report["main"]

    # Every stream that was not cancelled completed, with the reference's text; what the
    # cancelled and timed-out ones got is a prefix of it; no other error came back.
    assert main["num_mismatches"] == 0, main["mismatches"]
    assert main["num_unexpected_errors"] == 0, main["unexpected_errors"]
    assert main["completed"] > scale.clients  # each client finished several streams
    assert main["cancelled"] > 0 and main["deadline_exceeded"] > 0
    # A fair share of each behaviour (30% cancel, 10% deadline, 60% complete).
    streams = main["streams"]
    assert 0.15 < main["cancelled"] / streams < 0.45, main
    assert 0.03 < (main["deadline_exceeded"] + main["deadline_finished"]) / streams < 0.2, main

    # Afterwards the engine holds nothing, and the server's tasks and streams are at baseline.
    after, before = report["after"], report["before"]
    assert (after["running"], after["waiting"], after["kv_blocks_used"]) == (0, 0, 0), after
    assert after["in_flight"] == 0
    assert after["tasks"] <= before["tasks"], (before, after)
    assert after["steps_total"] > before["steps_total"]
    # Memory measured after the warm-up stays flat under the same load.
    assert report["rss_growth_pct"] < RSS_GROWTH_LIMIT_PCT, report
