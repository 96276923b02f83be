"""The seed guide's examples give the same tokens in process and through the server
(default model), and the scripts in examples/ run both ways, one line apart."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clients import RemoteModelForCausalLM

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ("basic_generation", "controlled_sampling", "async_generation")
PARIS = [{"role": "user", "content": "What are the best things to do in Paris?"}]
GPUS = [{"role": "user", "content": "What is the latest generation of Nvidia GPUs?"}]


@pytest.fixture(scope="module")
def models(default_server):
    from engine.modeling import CausalLM

    remote = RemoteModelForCausalLM(default_server.target, timeout=300)
    yield CausalLM(default_server.engine), remote
    remote.close()


def prompt_ids(server, messages) -> torch.Tensor:
    tok = server.engine.tokenizer
    return torch.tensor([tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)])


def test_basic_generation(default_server, models):
    local, remote = models
    ids = prompt_ids(default_server, PARIS)
    expected = local.generate(ids, max_new_tokens=100)
    assert expected.shape[1] > ids.shape[1] + 10, "the model should answer at some length"
    assert torch.equal(remote.generate(ids, max_new_tokens=100), expected)


def test_controlled_sampling_with_a_seed(default_server, models):
    local, remote = models
    ids = prompt_ids(default_server, PARIS)
    kwargs = {"max_new_tokens": 100, "do_sample": True, "temperature": 0.7, "top_k": 50, "top_p": 0.95, "seed": 42}
    expected = local.generate(ids, **kwargs)
    assert torch.equal(remote.generate(ids, **kwargs), expected)
    # The seed matters (20 tokens are enough to tell).
    other = local.generate(ids, **{**kwargs, "seed": 43, "max_new_tokens": 20})
    assert not torch.equal(other, expected[:, : other.shape[1]])


def test_async_agenerate(default_server, models):
    local, remote = models
    ids = prompt_ids(default_server, GPUS)
    expected = local.generate(ids, max_new_tokens=50)
    assert torch.equal(asyncio.run(remote.agenerate(ids, max_new_tokens=50)), expected)


def _code_lines(path: Path) -> list[str]:
    """The script below its module docstring."""
    text = path.read_text()
    return text[text.index('"""', 3) + 3 :].splitlines()


@pytest.mark.parametrize("name", EXAMPLES)
def test_remote_example_changes_one_line(name):
    local, remote = _code_lines(ROOT / "examples" / f"{name}.py"), _code_lines(ROOT / "examples" / f"remote_{name}.py")
    assert len(local) == len(remote)
    changed = [(a, b) for a, b in zip(local, remote) if a != b]
    assert changed == [("from engine import AutoModelForCausalLM", changed[0][1])]
    assert changed[0][1].startswith("from clients import RemoteModelForCausalLM as AutoModelForCausalLM")


def _run_example(module: str, target: str) -> str:
    env = {**os.environ, "TEXTGEN_TARGET": target}
    done = subprocess.run(
        [sys.executable, "-m", f"examples.{module}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_scripts_print_the_same_both_ways(default_server, name):
    in_process = _run_example(name, default_server.target)
    remote = _run_example(f"remote_{name}", default_server.target)
    assert len(in_process.strip()) > 20
    assert remote == in_process
