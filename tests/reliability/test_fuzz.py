"""Fuzz: random GenerateRequests, built field by field, never break the server.

Every answer is OK, INVALID_ARGUMENT, OUT_OF_RANGE or RESOURCE_EXHAUSTED (never
INTERNAL or UNKNOWN), within a per-call deadline (never a hang); an OK answer holds
every sequence, each with a finish reason; after each case the engine holds no request
and no KV block; after the run the server still answers a known request exactly.

The server serves the tiny model with a 48-token context, so that even an absurd
max_new_tokens stays cheap (it is clamped to the context), and a small KV pool and
max_num_seqs, so that requests over either limit come up often.
2,000 cases under `make test` (fixed seed); `make fuzz` runs many more, randomly.
"""

from __future__ import annotations

import collections
import math
import os

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clients.textgen.v1 import generate_pb2, generation_config_pb2, text_generation_service_pb2_grpc
from tests.reliability.helpers import fuzz_examples
from tests.servers import BackgroundServer

ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
CALL_DEADLINE_S = 30.0
CONTEXT = 48

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
EXTREME_INTS = [0, 1, -1, 2, 63, 64, 65, 2**31 - 1, -(2**31), 2**15, -(2**15)]
EXTREME_FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, 1.5, 1e-300, 5e-324, 1e300, -1e300, math.inf, -math.inf, math.nan]

int32s = st.one_of(st.integers(*INT32), st.sampled_from(EXTREME_INTS), st.integers(-3, 70))
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(EXTREME_FLOATS), st.floats(0, 2))
# Mostly a few tokens, so that each case stays cheap; sometimes anything an int32 holds.
max_new_tokens = st.one_of(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4), int32s)
texts = st.text(st.characters(exclude_categories=("Cs",)), max_size=120)
short_texts = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=8)
roles = st.one_of(st.sampled_from(["system", "user", "assistant", "tool"]), texts)


def optional(strategy):
    return st.one_of(st.none(), strategy)


# Per field: (plausible values, anything the wire type holds). A case draws either from
# the plausible ones only (so that many requests are served) or from anything (chaos).
CONFIG_FIELDS = {
    "max_new_tokens": (st.integers(1, 4), max_new_tokens),
    "min_new_tokens": (st.integers(0, 6), int32s),
    "do_sample": (st.booleans(), st.booleans()),
    "temperature": (st.floats(0.05, 3.0), floats),
    "top_k": (st.integers(0, 100), int32s),
    "top_p": (st.floats(0.01, 1.0), floats),
    "min_p": (st.floats(0.0, 1.0), floats),
    "repetition_penalty": (st.floats(0.5, 2.0), floats),
    "no_repeat_ngram_size": (st.integers(0, 4), int32s),
    "num_beams": (st.integers(1, 4), st.one_of(st.integers(1, 4), int32s)),
    "length_penalty": (st.floats(-2.0, 2.0), floats),
    "num_return_sequences": (st.integers(1, 4), st.one_of(st.integers(1, 4), int32s)),
    "seed": (st.integers(0, 2**63 - 1), st.integers(*INT64)),
    "ignore_eos": (st.booleans(), st.booleans()),
}


@st.composite
def generation_configs(draw, chaos: bool) -> generation_config_pb2.GenerationConfig:
    config = generation_config_pb2.GenerationConfig()
    for name, (plausible, anything) in CONFIG_FIELDS.items():
        value = draw(optional(anything if chaos else plausible))
        if value is not None:
            setattr(config, name, value)
    # Proto3 enums are open: any int32 reaches the server, not only the named values.
    config.early_stopping = draw(st.one_of(st.integers(0, 3), int32s) if chaos else st.integers(0, 3))
    config.stop_sequences.extend(draw(st.lists(short_texts, max_size=3)))
    if chaos and draw(st.booleans()):  # many stop strings, around the limit of 64
        config.stop_sequences.extend(f"stop{i}" for i in range(draw(st.integers(0, 100))))
    config.stop_token_ids.extend(draw(st.lists(int32s if chaos else st.integers(0, 49151), max_size=8)))
    return config


@st.composite
def generate_requests(draw) -> generate_pb2.GenerateRequest:
    chaos = draw(st.booleans())
    request = generate_pb2.GenerateRequest()
    request_id = draw(optional(texts))
    if request_id is not None:
        request.request_id = request_id
    kind = draw(st.sampled_from(["text", "token_ids", "messages"] + ["none"] * chaos))
    if kind == "text":
        request.text = draw(texts)
    elif kind == "token_ids":
        request.token_ids.SetInParent()
        length = draw(st.integers(0, CONTEXT + 8))
        first = draw(st.integers(0, 49151))
        request.token_ids.ids.extend((first + 7919 * i) % 49152 for i in range(length))
        if chaos and length and draw(st.booleans()):  # one id anywhere an int32 reaches
            request.token_ids.ids[draw(st.integers(0, length - 1))] = draw(int32s)
    elif kind == "messages":
        request.messages.SetInParent()
        role = roles if chaos else st.sampled_from(["system", "user"])
        turns = st.lists(st.tuples(role, texts), max_size=4)
        for role, content in draw(turns):
            request.messages.messages.add(role=role, content=content)
    if draw(st.booleans()):
        request.config.CopyFrom(draw(generation_configs(chaos)))
    request.logprobs = draw(st.booleans())
    request.top_logprobs = draw(st.one_of(st.integers(0, 3), st.integers(0, 2**32 - 1)) if chaos else st.integers(0, 3))
    request.return_prompt_token_ids = draw(st.booleans())
    return request


@pytest.fixture(scope="module")
def fuzz_server(tiny_llama):
    from engine import AsyncEngine

    engine = AsyncEngine.from_pretrained(
        tiny_llama, max_model_len=CONTEXT, num_kv_blocks=24, block_size=16, max_num_seqs=8, max_waiting_requests=16
    )
    server = BackgroundServer(engine)
    yield server
    server.close()


@pytest.fixture(scope="module")
def stub(fuzz_server):
    with grpc.insecure_channel(fuzz_server.target) as channel:
        yield text_generation_service_pb2_grpc.TextGenerationServiceStub(channel)


def call(stub, request, stream: bool) -> grpc.StatusCode:
    """Send one request; check the shape of an OK answer; return the status code."""
    try:
        if stream:
            messages = list(stub.GenerateStream(request, timeout=CALL_DEADLINE_S))
            last = {}
            for m in messages:
                assert last.get(m.index, 0) == 0, "a message after its sequence finished"
                last[m.index] = m.finish_reason
            assert last and all(reason != 0 for reason in last.values()), "a sequence without a finish reason"
        else:
            response = stub.Generate(request, timeout=CALL_DEADLINE_S)
            assert response.sequences, "an OK answer without sequences"
            assert all(s.finish_reason != 0 for s in response.sequences)
        return grpc.StatusCode.OK
    except grpc.RpcError as error:
        return error.code()


OUTCOMES: collections.Counter = collections.Counter()
PROFILE = dict(
    max_examples=fuzz_examples(),
    deadline=None,
    # A fixed seed under make test (a failure is the same on every run); random under make fuzz.
    derandomize=os.environ.get("TEXTGEN_FUZZ_RANDOM") != "1",
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


@settings(**PROFILE)
@given(request=generate_requests(), stream=st.booleans())
def test_random_requests_get_a_clean_answer(fuzz_server, stub, request, stream):
    code = call(stub, request, stream)
    OUTCOMES[code.name] += 1
    assert code in ALLOWED, f"{code.name} for {request}"
    # Each case ends with the engine empty: nothing leaked, nothing left waiting.
    fuzz_server.wait_idle(timeout=10)


def test_the_server_serves_after_the_fuzz(fuzz_server, stub):
    # Runs after the fuzz (file order): the outcomes cover success and each kind of refusal.
    print(f"fuzz outcomes: {dict(OUTCOMES)}")
    assert sum(OUTCOMES.values()) >= fuzz_examples()
    assert OUTCOMES["OK"] > 0 and OUTCOMES["INVALID_ARGUMENT"] > 0 and OUTCOMES["OUT_OF_RANGE"] > 0
    stats = fuzz_server.wait_idle()
    assert stats.healthy
    from engine import GenerationRequest

    engine = fuzz_server.engine
    ids = engine.tokenizer.encode("The sea is")
    expected = fuzz_server.engine_outputs(GenerationRequest(ids, engine.resolve_params(len(ids), max_new_tokens=6)))
    config = generation_config_pb2.GenerationConfig(max_new_tokens=6)
    response = stub.Generate(generate_pb2.GenerateRequest(text="The sea is", config=config), timeout=30)
    assert list(response.sequences[0].token_ids) == [t for o in expected for s in o.sequences for t in s.token_ids]
