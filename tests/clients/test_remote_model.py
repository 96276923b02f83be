"""RemoteModelForCausalLM takes and returns tensors exactly as the engine's in-process model."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import GenerationConfig

from clients import RemoteModelForCausalLM
from tests.engine.helpers import RecordingStreamer


@pytest.fixture(scope="module")
def models(tiny_server):
    from engine.modeling import CausalLM

    remote = RemoteModelForCausalLM(tiny_server.target, timeout=120)
    yield CausalLM(tiny_server.engine), remote
    remote.close()


ROWS = torch.tensor([[5, 6, 7, 8, 9], [2, 2, 2, 11, 12]])
MASK = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 1, 1]])

CASES = {
    "one row, greedy": (ROWS[:1], None, {"max_new_tokens": 10}),
    "1-D input": (ROWS[0], None, {"max_new_tokens": 4}),
    "left padding, mask": (ROWS, MASK, {"max_new_tokens": 9}),
    "max_length": (ROWS, MASK, {"max_length": 12}),
    "seeded samples per row": (
        ROWS,
        MASK,
        {"max_new_tokens": 7, "do_sample": True, "num_return_sequences": 2, "seed": 5},
    ),
    "early eos, right padding": (
        ROWS,
        MASK,
        {"max_new_tokens": 20, "stop_strings": ["a"], "top_k": 3, "do_sample": True, "seed": 1},
    ),
    "generation_config": (
        ROWS,
        MASK,
        {"generation_config": GenerationConfig(max_new_tokens=6, repetition_penalty=1.2)},
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_generate_returns_what_the_engine_returns(models, case):
    local, remote = models
    ids, mask, kwargs = CASES[case]
    expected = local.generate(ids, attention_mask=mask, **kwargs)
    got = remote.generate(ids, attention_mask=mask, **kwargs)
    assert got.dtype == torch.long and got.shape == expected.shape
    assert torch.equal(got, expected)
    if case == "early eos, right padding":
        assert (expected[:, -1] == 2).any(), "meant to cover a row that ends early and is right-padded"


def test_agenerate_returns_what_generate_returns(models):
    local, remote = models
    kwargs = {"max_new_tokens": 8, "do_sample": True, "seed": 11, "num_return_sequences": 2}
    expected = local.generate(ROWS, attention_mask=MASK, **kwargs)
    assert torch.equal(asyncio.run(remote.agenerate(ROWS, attention_mask=MASK, **kwargs)), expected)
    assert torch.equal(asyncio.run(local.agenerate(ROWS, attention_mask=MASK, **kwargs)), expected)


def test_beam_search_dict_output(models):
    local, remote = models
    kwargs = {"max_new_tokens": 6, "num_beams": 3, "num_return_sequences": 2, "return_dict_in_generate": True}
    expected = local.generate(ROWS, attention_mask=MASK, **kwargs)
    got = remote.generate(ROWS, attention_mask=MASK, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    assert torch.allclose(got.sequences_scores, expected.sequences_scores, rtol=1e-5)
    assert torch.equal(got["sequences"], got.sequences)


def test_from_pretrained_reads_the_target_from_the_environment(tiny_server, monkeypatch):
    monkeypatch.setenv("TEXTGEN_TARGET", tiny_server.target)
    model = RemoteModelForCausalLM.from_pretrained("default", use_fp8=True)
    assert model.target == tiny_server.target
    assert model.model_info.vocab_size == tiny_server.engine.info.vocab_size
    model.close()


@pytest.mark.parametrize("kwargs", [{"max_new_tokens": 9}, {"max_new_tokens": 6, "do_sample": True, "seed": 3}])
def test_a_streamer_gets_the_same_puts_as_in_process(models, kwargs):
    local, remote = models
    streamers = {name: RecordingStreamer() for name in ("local", "remote", "remote async")}
    expected = local.generate(ROWS[:1], streamer=streamers["local"], **kwargs)
    got = remote.generate(ROWS[:1], streamer=streamers["remote"], **kwargs)
    got_async = asyncio.run(remote.agenerate(ROWS[:1], streamer=streamers["remote async"], **kwargs))
    assert torch.equal(got, expected) and torch.equal(got_async, expected)
    assert streamers["local"].puts[0] == ROWS[:1].tolist() and len(streamers["local"].puts) > 1
    for name in ("remote", "remote async"):
        assert streamers[name].puts == streamers["local"].puts and streamers[name].ended == 1


def test_a_streamer_with_beams_or_two_rows_is_refused(models):
    _, remote = models
    for ids, kwargs in ((ROWS[:1], {"num_beams": 2}), (ROWS, {})):
        with pytest.raises(ValueError, match="streamer"):
            remote.generate(ids, attention_mask=MASK[: len(ids)], max_new_tokens=3, streamer=RecordingStreamer(), **kwargs)
