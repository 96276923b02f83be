"""Bad requests get the right status code and a BadRequest detail naming the field;
the server keeps serving. Overload and a stopped engine map to their codes too."""

from __future__ import annotations

import math
import time

import grpc
import pytest

from clients import TextGenerationClient, TextGenerationError
from clients.textgen.v1 import generate_pb2, generation_config_pb2, text_generation_service_pb2_grpc
from tests.servers import BackgroundServer

INVALID = grpc.StatusCode.INVALID_ARGUMENT
TEXT = "Hello there"

# (name, prompt, options, status code, field named in BadRequest)
CASES = [
    ("empty token ids", [], {}, INVALID, "input"),
    ("token id outside vocab", [1, 10**7], {}, INVALID, "token_ids.ids"),
    ("negative token id", [1, -5], {}, INVALID, "token_ids.ids"),
    ("unknown chat role", [{"role": "robot", "content": "hi"}], {}, INVALID, "messages[0].role"),
    ("prompt over the context", [7] * 600, {}, grpc.StatusCode.OUT_OF_RANGE, "input"),
    ("max_new_tokens 0", TEXT, {"max_new_tokens": 0}, INVALID, "config.max_new_tokens"),
    ("negative min_new_tokens", TEXT, {"min_new_tokens": -1}, INVALID, "config.min_new_tokens"),
    ("temperature 0 when sampling", TEXT, {"do_sample": True, "temperature": 0.0}, INVALID, "config.temperature"),
    ("top_p above 1", TEXT, {"do_sample": True, "top_p": 1.5}, INVALID, "config.top_p"),
    ("negative top_k", TEXT, {"do_sample": True, "top_k": -1}, INVALID, "config.top_k"),
    ("min_p above 1", TEXT, {"do_sample": True, "min_p": 2.0}, INVALID, "config.min_p"),
    ("repetition_penalty 0", TEXT, {"repetition_penalty": 0.0}, INVALID, "config.repetition_penalty"),
    ("negative no_repeat_ngram_size", TEXT, {"no_repeat_ngram_size": -2}, INVALID, "config.no_repeat_ngram_size"),
    ("num_beams 0", TEXT, {"num_beams": 0}, INVALID, "config.num_beams"),
    ("greedy with 2 sequences", TEXT, {"num_return_sequences": 2}, INVALID, "config.num_return_sequences"),
    (
        "more sequences than beams",
        TEXT,
        {"num_beams": 2, "num_return_sequences": 3},
        INVALID,
        "config.num_return_sequences",
    ),
    ("negative seed", TEXT, {"seed": -1}, INVALID, "config.seed"),
    ("empty stop sequence", TEXT, {"stop_sequences": [""]}, INVALID, "config.stop_sequences"),
    ("negative stop token", TEXT, {"stop_token_ids": [-3]}, INVALID, "config.stop_token_ids"),
    ("too many logprobs", TEXT, {"top_logprobs": 21}, INVALID, "top_logprobs"),
    # Extreme values, as a hostile or buggy client sends them.
    ("empty text", "", {}, INVALID, "input"),
    ("NaN temperature", TEXT, {"do_sample": True, "temperature": math.nan}, INVALID, "config.temperature"),
    ("+inf temperature", TEXT, {"do_sample": True, "temperature": math.inf}, INVALID, "config.temperature"),
    ("-inf temperature", TEXT, {"do_sample": True, "temperature": -math.inf}, INVALID, "config.temperature"),
    ("top_p 0", TEXT, {"do_sample": True, "top_p": 0.0}, INVALID, "config.top_p"),
    ("NaN top_p", TEXT, {"do_sample": True, "top_p": math.nan}, INVALID, "config.top_p"),
    ("NaN min_p", TEXT, {"do_sample": True, "min_p": math.nan}, INVALID, "config.min_p"),
    ("inf repetition_penalty", TEXT, {"repetition_penalty": math.inf}, INVALID, "config.repetition_penalty"),
    ("NaN length_penalty", TEXT, {"num_beams": 2, "length_penalty": math.nan}, INVALID, "config.length_penalty"),
    ("negative max_new_tokens", TEXT, {"max_new_tokens": -5}, INVALID, "config.max_new_tokens"),
    ("int32 min max_new_tokens", TEXT, {"max_new_tokens": -(2**31)}, INVALID, "config.max_new_tokens"),
    ("int32 min top_k", TEXT, {"do_sample": True, "top_k": -(2**31)}, INVALID, "config.top_k"),
    ("int64 min seed", TEXT, {"seed": -(2**63)}, INVALID, "config.seed"),
    ("uint32 max logprobs", TEXT, {"top_logprobs": 2**32 - 1}, INVALID, "top_logprobs"),
    ("int32 max beams", TEXT, {"num_beams": 2**31 - 1}, INVALID, "config.num_beams"),
    ("beams over max_num_seqs", TEXT, {"num_beams": 65}, INVALID, "config.num_beams"),
    ("int32 max token id", [1, 2**31 - 1], {}, INVALID, "token_ids.ids"),
    ("thousands of stop strings", TEXT, {"stop_sequences": [f"s{i}" for i in range(5000)]}, INVALID,
     "config.stop_sequences"),
    ("samples over the KV pool", TEXT, {"do_sample": True, "num_return_sequences": 40, "max_new_tokens": 400},
     grpc.StatusCode.OUT_OF_RANGE, "config.max_new_tokens"),
    ("unknown role among good ones", [{"role": "user", "content": "hi"}, {"role": "", "content": "x"}], {}, INVALID,
     "messages[1].role"),
]  # fmt: skip


@pytest.fixture(scope="module")
def client(tiny_server):
    with TextGenerationClient(tiny_server.target, timeout=60) as client:
        yield client


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("name, prompt, options, code, field", CASES, ids=[c[0] for c in CASES])
def test_invalid_request(tiny_server, client, name, prompt, options, code, field, stream):
    with pytest.raises(TextGenerationError) as caught:
        if stream:
            list(client.generate_stream(prompt, **options))
        else:
            client.generate(prompt, **options)
    assert caught.value.code == code, caught.value
    assert [f for f, _ in caught.value.field_violations] == [field]
    assert caught.value.message.startswith(field)
    # The server is unharmed: the next request is served, and nothing is left in the engine.
    assert client.generate(TEXT, max_new_tokens=2).sequences[0].finish_reason in ("length", "eos_token")
    tiny_server.wait_idle()


def test_request_without_input(tiny_server):
    with grpc.insecure_channel(tiny_server.target) as channel:
        stub = text_generation_service_pb2_grpc.TextGenerationServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Generate(generate_pb2.GenerateRequest(config=generation_config_pb2.GenerationConfig()))
    assert caught.value.code() == INVALID
    assert caught.value.details().startswith("input:")


def test_message_over_the_receive_limit(tiny_server, client):
    # 5 MiB of text: over the server's deliberate 4 MiB receive limit (service/server.py).
    options = [("grpc.max_send_message_length", 64 << 20)]
    with grpc.insecure_channel(tiny_server.target, options=options) as channel:
        stub = text_generation_service_pb2_grpc.TextGenerationServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Generate(generate_pb2.GenerateRequest(text="a" * (5 << 20)))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert client.generate(TEXT, max_new_tokens=2).usage.completion_tokens >= 1


def test_absurd_max_new_tokens_is_clamped_to_the_context(tiny_server, client):
    ids = tiny_server.engine.tokenizer.encode(TEXT)
    result = client.generate(ids, max_new_tokens=2**31 - 1, ignore_eos=True)
    assert result.sequences[0].finish_reason == "length"
    assert result.usage.completion_tokens == tiny_server.engine.info.max_model_len - len(ids)
    tiny_server.wait_idle()


def test_chat_message_over_the_receive_limit(tiny_server, client):
    options = [("grpc.max_send_message_length", 64 << 20)]
    message = generate_pb2.ChatMessage(role="user", content="b" * (5 << 20))
    with grpc.insecure_channel(tiny_server.target, options=options) as channel:
        stub = text_generation_service_pb2_grpc.TextGenerationServiceStub(channel)
        request = generate_pb2.GenerateRequest(messages=generate_pb2.ChatMessages(messages=[message]))
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.GenerateStream(request, timeout=60))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert client.generate(TEXT, max_new_tokens=2).usage.completion_tokens >= 1


def test_full_queue_is_resource_exhausted_within_100_ms_and_admitted_calls_finish(tiny_server, tiny_llama):
    from engine import AsyncEngine

    options = dict(max_new_tokens=250, ignore_eos=True)
    prompts = [TEXT, TEXT + " again"]
    with TextGenerationClient(tiny_server.target, timeout=60) as reference:
        expected = [reference.generate(p, **options).sequences[0].token_ids for p in prompts]
    # Room for one running and one waiting request: a third is refused.
    engine = AsyncEngine.from_pretrained(tiny_llama, num_kv_blocks=64, max_num_seqs=1, max_waiting_requests=1)
    server = BackgroundServer(engine)
    try:
        with TextGenerationClient(server.target, timeout=60) as client, grpc.insecure_channel(server.target) as channel:
            client.generate(TEXT, max_new_tokens=1)  # the connection is up before the clock runs
            # Two long streams (about 1 s each, one after the other), started without reading them.
            stub = text_generation_service_pb2_grpc.TextGenerationServiceStub(channel)
            config = generation_config_pb2.GenerationConfig(**options)
            streams = [stub.GenerateStream(generate_pb2.GenerateRequest(text=p, config=config)) for p in prompts]
            _wait_for(lambda: engine.stats().running + engine.stats().waiting == 2)
            waits = []
            for i in range(10):
                began = time.monotonic()
                with pytest.raises(TextGenerationError) as caught:
                    if i % 2:
                        list(client.generate_stream(TEXT, max_new_tokens=2))
                    else:
                        client.generate(TEXT, max_new_tokens=2)
                waits.append(time.monotonic() - began)
                assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert engine.stats().running + engine.stats().waiting == 2  # still full: every refusal was due
            assert max(waits) < 0.1, waits
            # The admitted calls were never disturbed: they run to their end, exactly.
            for stream, want in zip(streams, expected):
                assert [t for message in stream for t in message.token_ids] == want
            server.wait_idle()
            assert client.generate(TEXT, max_new_tokens=2).usage.completion_tokens >= 1
    finally:
        server.close()


def test_request_id_in_use_is_refused_and_the_first_call_goes_on(tiny_server, client):
    first = client.generate_stream(TEXT, max_new_tokens=300, ignore_eos=True, request_id="same-id")
    chunks = [next(first)]
    with pytest.raises(TextGenerationError) as caught:
        client.generate(TEXT, max_new_tokens=2, request_id="same-id")
    assert caught.value.code == grpc.StatusCode.ALREADY_EXISTS
    chunks += list(first)
    assert sum(len(c.token_ids) for c in chunks) == 300 and chunks[-1].finish_reason == "length"
    # Once it finished, the id is free again.
    assert client.generate(TEXT, max_new_tokens=2, request_id="same-id").request_id == "same-id"


def _wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_stopped_engine_is_unavailable(tiny_llama):
    from engine import AsyncEngine

    engine = AsyncEngine.from_pretrained(tiny_llama, num_kv_blocks=64)
    server = BackgroundServer(engine)
    try:
        server.run(engine.shutdown())
        with TextGenerationClient(server.target, timeout=60) as client:
            with pytest.raises(TextGenerationError) as caught:
                client.generate(TEXT, max_new_tokens=2)
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        server.close()
