"""Regressions for what the fuzz and the fault tests found, each at the smallest scale.

- engine/engine_loop.py: a request with more sequences (beams, samples) than max_num_seqs
  was admitted and then never scheduled (a hang); one whose sequences together outgrow
  the KV pool was admitted and failed mid-way (INTERNAL). Both are refused at submit now.
- engine/engine_loop.py: the watchdog measured from the last step before an idle spell,
  so the first step after idling longer than watchdog_timeout_s looked stuck.
- engine/sampling/beam_search.py: an extreme length_penalty raised OverflowError (the
  whole step failed, INTERNAL for every request in it) or left no finished hypothesis
  (an OK answer without sequences).
- service/convert.py: an early_stopping value outside the enum (proto3 enums are open)
  raised KeyError (INTERNAL).
- service/request_run.py: an empty request_id was used as is, so the RPC's abort guard
  named no engine request.
"""

from __future__ import annotations

import asyncio
import math

import grpc
import pytest
import torch

from clients.textgen.v1 import generate_pb2, generation_config_pb2, text_generation_service_pb2_grpc
from engine.errors import ContextLengthError, InvalidParameterError
from engine.params import GenerationRequest, SamplingParams
from engine.sampling.beam_search import BeamSearch


@pytest.fixture(scope="module")
def engine(tiny_llama):
    from engine import AsyncEngine

    engine = AsyncEngine.from_pretrained(tiny_llama, num_kv_blocks=16, block_size=16, max_num_seqs=4)
    yield engine
    asyncio.run(engine.shutdown())


async def _collect(engine, prompt, **params):
    request = GenerationRequest(prompt, engine.resolve_params(len(prompt), **params))
    return [output async for output in engine.generate(request)]


@pytest.mark.parametrize(
    "params, error, field",
    [
        (dict(num_beams=5, max_new_tokens=2), InvalidParameterError, "num_beams"),
        (dict(do_sample=True, num_return_sequences=5, max_new_tokens=2), InvalidParameterError, "num_return_sequences"),
        # 4 x ceil((3 + 62) / 16) = 20 blocks > 16, though one sequence (5 blocks) fits.
        (dict(do_sample=True, num_return_sequences=4, max_new_tokens=62), ContextLengthError, "max_new_tokens"),
    ],
)
def test_requests_that_could_never_run_are_refused_at_submit(engine, params, error, field):
    with pytest.raises(error) as caught:
        asyncio.run(asyncio.wait_for(_collect(engine, [1, 2, 3], **params), 10))
    assert caught.value.field == field
    # Just inside both limits, the same request runs to its end.
    ok = dict(params, **({"num_beams": 4} if "num_beams" in params else {"num_return_sequences": 4}))
    ok["max_new_tokens"] = min(ok["max_new_tokens"], 61)
    outputs = asyncio.run(asyncio.wait_for(_collect(engine, [1, 2, 3], **ok), 60))
    assert outputs[-1].finished and outputs[-1].error is None
    assert engine.stats().kv_blocks_used == 0


def test_the_first_step_after_an_idle_spell_is_not_stuck(tiny_llama):
    import time

    from engine import AsyncEngine

    engine = AsyncEngine.from_pretrained(tiny_llama, num_kv_blocks=16, watchdog_timeout_s=0.2)
    runtime = engine._loop.engine.runtime
    execute, seen = runtime.execute, []

    def observed(batch):
        time.sleep(0.05)
        seen.append(engine.is_healthy)
        return execute(batch)

    runtime.execute = observed
    try:
        time.sleep(0.5)  # idle for longer than the watchdog's timeout
        asyncio.run(asyncio.wait_for(_collect(engine, [1, 2, 3], max_new_tokens=3), 30))
        assert seen and all(seen)
    finally:
        asyncio.run(engine.shutdown())


@pytest.mark.parametrize("length_penalty", [1e300, -1e300, 400.0, -400.0, 1e-300])
@pytest.mark.parametrize("num_return_sequences", [1, 3])
def test_beam_search_survives_extreme_length_penalties(length_penalty, num_return_sequences):
    params = SamplingParams(
        max_new_tokens=6, num_beams=3, num_return_sequences=num_return_sequences,
        length_penalty=length_penalty, eos_token_ids=(2,),
    )  # fmt: skip
    search = BeamSearch(params, [1, 5, 7], params.max_new_tokens)
    generator = torch.Generator().manual_seed(0)
    for _ in range(params.max_new_tokens):
        logits = torch.randn(len(search.live_beams), 50, generator=generator)
        logits[:, 2] += 2.0  # eos is likely: hypotheses finish along the way
        if search.step(logits).done:
            break
    assert search.done
    hypotheses = search.finalize()
    assert len(hypotheses) == num_return_sequences
    assert all(h.token_ids and not math.isnan(h.score) for h in hypotheses)


def test_an_unknown_early_stopping_value_is_invalid(tiny_server):
    config = generation_config_pb2.GenerationConfig(max_new_tokens=2, num_beams=2)
    config.early_stopping = 99  # not a named EarlyStopping value; proto3 lets it through
    with grpc.insecure_channel(tiny_server.target) as channel:
        stub = text_generation_service_pb2_grpc.TextGenerationServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Generate(generate_pb2.GenerateRequest(text="Hi", config=config), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "config.early_stopping: unknown value 99"


def test_an_empty_request_id_is_replaced_by_a_server_made_one(tiny_server):
    config = generation_config_pb2.GenerationConfig(max_new_tokens=2)
    with grpc.insecure_channel(tiny_server.target) as channel:
        stub = text_generation_service_pb2_grpc.TextGenerationServiceStub(channel)
        response = stub.Generate(generate_pb2.GenerateRequest(request_id="", text="Hi", config=config), timeout=30)
    assert response.request_id.startswith("req-")
