"""Generate and GenerateStream answer exactly what the engine answers in process (tiny model)."""

from __future__ import annotations

import concurrent.futures

import pytest

from clients import TextGenerationClient
from tests.parity import client_sequences, engine_sequences, join_stream, same

PROMPT = "The quick brown fox jumps over the lazy dog"

CASES = {
    "greedy": dict(max_new_tokens=12),
    "seeded sampling": dict(max_new_tokens=12, do_sample=True, temperature=0.7, top_k=50, top_p=0.95, seed=7),
    "two samples": dict(max_new_tokens=8, do_sample=True, num_return_sequences=2, seed=3),
    "beam search": dict(max_new_tokens=8, num_beams=3, num_return_sequences=2),
    "penalties": dict(max_new_tokens=10, repetition_penalty=1.3, no_repeat_ngram_size=2, min_new_tokens=10),
}


@pytest.fixture(scope="module")
def client(tiny_server):
    with TextGenerationClient(tiny_server.target, timeout=120) as client:
        yield client


@pytest.mark.parametrize("case", CASES)
def test_unary_equals_engine(tiny_server, client, case):
    ids = tiny_server.engine.tokenizer.encode(PROMPT)
    expected, last = engine_sequences(tiny_server, ids, **CASES[case])
    result = client.generate(PROMPT, **CASES[case])
    assert same(client_sequences(result.sequences), expected)
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (last.prompt_tokens, last.completion_tokens)


@pytest.mark.parametrize("case", CASES)
def test_stream_equals_engine(tiny_server, client, case):
    ids = tiny_server.engine.tokenizer.encode(PROMPT)
    expected, _ = engine_sequences(tiny_server, ids, **CASES[case])
    chunks = list(client.generate_stream(ids, **CASES[case]))
    assert same(join_stream(chunks), expected)


def test_stream_sends_tokens_as_they_come(tiny_server, client):
    # One message per step while the client keeps up; steps that piled up behind a slow
    # reader go out as one message (engine/async_engine.py). Either way the tokens arrive
    # over many messages, not at the end.
    chunks = [c for c in client.generate_stream(PROMPT, max_new_tokens=64, min_new_tokens=64) if c.token_ids]
    assert sum(len(c.token_ids) for c in chunks) == 64
    assert len(chunks) > 1


def test_stop_sequence_is_never_sent(tiny_server, client):
    free = client.generate(PROMPT, max_new_tokens=16).text
    stop = free[len(free) // 2 : len(free) // 2 + 3]
    ids = tiny_server.engine.tokenizer.encode(PROMPT)
    expected, _ = engine_sequences(tiny_server, ids, max_new_tokens=16, stop_strings=[stop])
    result = client.generate(PROMPT, max_new_tokens=16, stop_sequences=[stop])
    streamed = join_stream(client.generate_stream(PROMPT, max_new_tokens=16, stop_sequences=[stop]))
    assert same(client_sequences(result.sequences), expected)
    assert same(streamed, expected)
    assert result.sequences[0].finish_reason == "stop_sequence"
    assert stop not in result.text and stop not in streamed[0]["text"]


def test_sixteen_concurrent_streams_all_complete(tiny_server, client):
    prompts = [f"{PROMPT} {i} " * (1 + i % 3) for i in range(16)]
    options = dict(max_new_tokens=24, ignore_eos=True)
    expected = [client_sequences(client.generate(p, **options).sequences) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        streamed = list(pool.map(lambda p: join_stream(client.generate_stream(p, **options)), prompts))
    for got, want in zip(streamed, expected):
        assert same(got, want)
        assert len(got[0]["token_ids"]) == 24
    tiny_server.wait_idle()


def test_response_options(tiny_server, client):
    ids = tiny_server.engine.tokenizer.encode(PROMPT)
    result = client.generate(ids, max_new_tokens=5, logprobs=True, top_logprobs=3, return_prompt_token_ids=True)
    seq = result.sequences[0]
    assert result.prompt_token_ids == ids
    assert [lp.token_id for lp in seq.logprobs] == seq.token_ids
    assert all(len(lp.top) == 3 for lp in seq.logprobs)
    # Greedy: the chosen token is the most likely one, and the sum matches the cumulative logprob.
    assert all(lp.top[0][0] == lp.token_id for lp in seq.logprobs)
    assert sum(lp.logprob for lp in seq.logprobs) == pytest.approx(seq.cumulative_logprob, rel=1e-5)
    chunks = list(client.generate_stream(ids, max_new_tokens=5, logprobs=True, return_prompt_token_ids=True))
    assert chunks[0].prompt_token_ids == ids and all(c.prompt_token_ids is None for c in chunks[1:])
    assert [lp.token_id for c in chunks for lp in c.logprobs] == seq.token_ids


def test_chat_messages_use_the_chat_template(tiny_server, client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    tok = tiny_server.engine.tokenizer
    ids = tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
    result = client.generate(messages, max_new_tokens=6, return_prompt_token_ids=True)
    expected, _ = engine_sequences(tiny_server, ids, max_new_tokens=6)
    assert result.prompt_token_ids == ids
    assert same(client_sequences(result.sequences), expected)


def test_tokenize_and_model_info(tiny_server, client):
    tok, info = tiny_server.engine.tokenizer, tiny_server.engine.info
    got = client.tokenize("Hello, wörld!", return_offsets=True)
    ids, offsets = tok.encode_with_offsets("Hello, wörld!")
    assert got.token_ids == ids and got.offsets == [tuple(o) for o in offsets]
    assert client.tokenize("Hello").offsets is None
    model = client.model_info()
    assert (model.model_id, model.architecture, model.dtype, model.fp8) == (
        info.model_id,
        info.architecture,
        info.dtype,
        info.fp8,
    )
    assert (model.max_context_length, model.vocab_size) == (info.max_model_len, info.vocab_size)
    assert model.eos_token_ids == list(info.eos_token_ids)
    assert model.pad_token_id == info.default_params.pad_token_id
    defaults = model.default_generation_config
    assert defaults["max_new_tokens"] == info.default_params.max_new_tokens
    assert defaults["do_sample"] == info.default_params.do_sample
    assert defaults["early_stopping"] == info.default_params.early_stopping


@pytest.mark.parametrize("rpc", ["generate", "stream", "tokenize"])
def test_a_long_prompt_is_tokenized_off_the_event_loop(tiny_server, client, monkeypatch, rpc):
    """While a long prompt is tokenized the server answers other calls. Here the tokenizer
    waits, holding the long call, until another call has been answered: were it run on
    the event loop, nothing else could be answered and the other call would time out."""
    import threading

    from service.convert import OFF_LOOP_CHARS

    tokenizer = tiny_server.engine.tokenizer
    started, answered = threading.Event(), threading.Event()
    real_encode = tokenizer.encode

    def encode(text, *args, **kwargs):
        if len(text) > OFF_LOOP_CHARS:
            started.set()
            answered.wait(30)
            text = PROMPT
        return real_encode(text, *args, **kwargs)

    monkeypatch.setattr(tokenizer, "encode", encode)
    long_text = "x" * (OFF_LOOP_CHARS + 1)
    calls = {
        "generate": lambda: client.generate(long_text, max_new_tokens=2).sequences[0].token_ids,
        "stream": lambda: join_stream(client.generate_stream(long_text, max_new_tokens=2))[0]["token_ids"],
        "tokenize": lambda: client.tokenize(long_text).token_ids,
    }
    with concurrent.futures.ThreadPoolExecutor(1) as pool, TextGenerationClient(tiny_server.target, timeout=5) as other:
        long_call = pool.submit(calls[rpc])
        try:
            assert started.wait(30)
            assert other.model_info().model_id == tiny_server.engine.info.model_id
        finally:
            answered.set()
        result = long_call.result(60)
    assert len(result) == (2 if rpc != "tokenize" else len(real_encode(PROMPT)))
