"""`python -m clients`, and clients/ standing on the protos alone (no engine/, no service/)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

from clients import TextGenerationClient

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "clients", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_cli_prints_the_generated_text(tiny_server):
    with TextGenerationClient(tiny_server.target) as client:
        expected = client.generate("Hello there", max_new_tokens=6).text
    plain = run_cli("Hello there", "--max-new-tokens", "6", "--target", tiny_server.target)
    streamed = run_cli("Hello there", "--stream", "--max-new-tokens", "6", "--target", tiny_server.target)
    assert plain.returncode == 0 and streamed.returncode == 0, plain.stderr + streamed.stderr
    assert plain.stdout == expected + "\n"
    assert streamed.stdout == expected + "\n"


def test_cli_reports_errors_with_a_status(tiny_server):
    done = run_cli("Hi", "--do-sample", "--temperature", "0", "--target", tiny_server.target)
    assert done.returncode == 1
    assert "INVALID_ARGUMENT" in done.stderr and "config.temperature" in done.stderr


def test_clients_import_neither_engine_nor_service():
    for path in (ROOT / "clients").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] in ("engine", "service") for n in names), f"{path}: imports {names}"
    # And at run time, every client loads without them.
    code = (
        "import sys, clients\n"
        "from clients import TextGenerationClient, AsyncTextGenerationClient, RemoteModelForCausalLM\n"
        "import clients.__main__\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('engine', 'service')]\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert done.returncode == 0, done.stderr
