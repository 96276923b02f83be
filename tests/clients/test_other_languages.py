"""Clients in other languages: Node (@grpc/grpc-js + @grpc/proto-loader) and `buf curl`
(through server reflection, no .proto files). Both give what the Python client gives."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import grpc
import pytest

from clients import TextGenerationClient

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "Once upon a time"
# node_modules comes from `npm ci`, which `make test` runs first.


@pytest.fixture(scope="module")
def expected(tiny_server):
    with TextGenerationClient(tiny_server.target, timeout=60) as client:
        return client.generate(PROMPT, max_new_tokens=8)


def test_node_client(tiny_server, expected):
    script = ROOT / "tests" / "clients" / "node" / "call_server.js"
    done = subprocess.run(
        ["node", str(script), tiny_server.target, PROMPT, "8"], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    [sequence] = result["unary"]["sequences"]
    assert sequence["token_ids"] == expected.sequences[0].token_ids
    assert sequence["text"] == expected.text
    assert sequence["finish_reason"] == "FINISH_REASON_" + expected.sequences[0].finish_reason.upper()
    assert result["unary"]["usage"]["completion_tokens"] == expected.usage.completion_tokens
    assert [t for m in result["stream"] for t in m["token_ids"]] == expected.sequences[0].token_ids
    assert "".join(m["text"] for m in result["stream"]) == expected.text
    assert result["invalid_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]


def test_buf_curl_through_reflection(tiny_server, expected):
    body = json.dumps({"text": PROMPT, "config": {"maxNewTokens": 8}})
    url = f"http://{tiny_server.target}/textgen.v1.TextGenerationService/Generate"
    command = ["npx", "--no-install", "buf", "curl", "--protocol", "grpc", "--http2-prior-knowledge", "-d", body, url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    [sequence] = json.loads(done.stdout)["sequences"]
    assert sequence["tokenIds"] == expected.sequences[0].token_ids
    assert sequence["text"] == expected.text
