"""generate()/agenerate() against transformers itself: same weights, same inputs, same tokens.

fp32 on the CPU. Greedy outputs must be identical token for token; beam scores agree
within 1e-4 (our attention and matmul order differ from transformers', so logits
differ at the 1e-6 level, and beam scores sum up to max_new_tokens log-probs).
"""

from __future__ import annotations

import asyncio

import pytest
import torch
import transformers

from engine import AutoModelForCausalLM, InvalidParameterError
from tests.engine.helpers import RecordingStreamer

PROMPTS = ["Hello, my name is", "The capital of France", "1, 2, 3,"]


def left_padded(tokenizer, prompts):
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:  # the tiny checkpoints' GGUF-derived tokenizer has none
        tokenizer.pad_token_id = 2
    return tokenizer(prompts, return_tensors="pt", padding=True)


@pytest.fixture(scope="module")
def pair(request, tiny_checkpoints):
    """(ours, transformers') for a tiny checkpoint kind given by indirect parametrization."""
    folder = tiny_checkpoints[request.param]
    ours = AutoModelForCausalLM.from_pretrained(folder, dtype="float32", num_kv_blocks=256)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return ours, ref


@pytest.mark.parametrize("pair", ["llama", "llama3-rope", "mistral", "qwen2"], indirect=True)
def test_greedy_parity_on_tiny_models(pair):
    ours, ref = pair
    inputs = left_padded(ours.tokenizer, PROMPTS)
    expected = ref.generate(**inputs, max_new_tokens=24, do_sample=False)
    got = ours.generate(inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=24, do_sample=False)
    assert torch.equal(got, expected)


@pytest.fixture(scope="module")
def default_pair(default_model_folder):
    ours = AutoModelForCausalLM.from_pretrained("default")
    ref = transformers.AutoModelForCausalLM.from_pretrained(default_model_folder, dtype=torch.float32).eval()
    return ours, ref


def test_greedy_parity_on_default_model_with_left_padding(default_pair):
    ours, ref = default_pair
    messages = [[{"role": "user", "content": p}] for p in ("What is 2+2?", "Name a colour.", "Write a haiku about the sea.")]
    texts = [ours.tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages]
    inputs = left_padded(ours.tokenizer, texts)
    expected = ref.generate(**inputs, max_new_tokens=32, do_sample=False)
    got = ours.generate(inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=32, do_sample=False)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("pair", ["llama"], indirect=True)
@pytest.mark.parametrize("num_beams,nrs,length_penalty,early_stopping", [(2, 1, 1.0, False), (4, 2, 0.7, True), (4, 4, 1.3, "never")])
def test_beam_search_parity(pair, num_beams, nrs, length_penalty, early_stopping):
    ours, ref = pair
    inputs = left_padded(ours.tokenizer, PROMPTS[:2])
    kwargs = dict(max_new_tokens=12, num_beams=num_beams, num_return_sequences=nrs, length_penalty=length_penalty,
                  early_stopping=early_stopping, do_sample=False, return_dict_in_generate=True, output_scores=True)
    expected = ref.generate(**inputs, **kwargs)
    got = ours.generate(inputs["input_ids"], attention_mask=inputs["attention_mask"], **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(got.sequences_scores, expected.sequences_scores, atol=1e-4, rtol=0)


@pytest.mark.parametrize("pair", ["llama"], indirect=True)
@pytest.mark.parametrize("span", [(6, 9), (4, 7)])
def test_beam_search_with_stop_strings_matches_transformers(pair, span):
    """Stop strings end beam-search candidates as eos does, in transformers'
    StopStringCriteria and here. The stop string is a piece of the text that the first
    prompt's best beam generates without it, so it must change the search."""
    ours, ref = pair
    inputs = left_padded(ours.tokenizer, PROMPTS[:2])
    kwargs = dict(max_new_tokens=12, num_beams=3, num_return_sequences=2, do_sample=False,
                  return_dict_in_generate=True, output_scores=True)
    plain = ref.generate(**inputs, **kwargs).sequences
    generated = ours.tokenizer.decode(plain[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    stop = generated[span[0] : span[1]]
    expected = ref.generate(**inputs, **kwargs, stop_strings=[stop], tokenizer=ours.tokenizer)
    got = ours.generate(inputs["input_ids"], attention_mask=inputs["attention_mask"], **kwargs, stop_strings=[stop])
    assert not torch.equal(expected.sequences, plain)
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(got.sequences_scores, expected.sequences_scores, atol=1e-4, rtol=0)


@pytest.mark.parametrize("pair", ["qwen2"], indirect=True)
def test_top_k_1_sampling_equals_greedy(pair):
    ours, _ = pair
    inputs = left_padded(ours.tokenizer, PROMPTS)
    args = (inputs["input_ids"],)
    greedy = ours.generate(*args, attention_mask=inputs["attention_mask"], max_new_tokens=16, do_sample=False)
    top1 = ours.generate(*args, attention_mask=inputs["attention_mask"], max_new_tokens=16, do_sample=True, top_k=1)
    assert torch.equal(greedy, top1)


@pytest.mark.parametrize("pair", ["llama"], indirect=True)
def test_repetition_penalty_and_ngram_parity(pair):
    ours, ref = pair
    inputs = left_padded(ours.tokenizer, PROMPTS)
    kwargs = dict(max_new_tokens=20, do_sample=False, repetition_penalty=1.3, no_repeat_ngram_size=2, min_new_tokens=5)
    expected = ref.generate(**inputs, **kwargs)
    got = ours.generate(inputs["input_ids"], attention_mask=inputs["attention_mask"], **kwargs)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("pair", ["mistral"], indirect=True)
def test_concurrent_agenerate_matches_generate(pair):
    ours, _ = pair
    rows = [ours.tokenizer(p, return_tensors="pt")["input_ids"] for p in PROMPTS * 3]
    sync = [ours.generate(r, max_new_tokens=10 + i, do_sample=False) for i, r in enumerate(rows)]
    seeded = [ours.generate(r, max_new_tokens=8, do_sample=True, seed=100 + i, temperature=0.8) for i, r in enumerate(rows)]

    async def main():
        greedy = [ours.agenerate(r, max_new_tokens=10 + i, do_sample=False) for i, r in enumerate(rows)]
        sampled = [ours.agenerate(r, max_new_tokens=8, do_sample=True, seed=100 + i, temperature=0.8) for i, r in enumerate(rows)]
        return await asyncio.gather(*greedy, *sampled)

    results = asyncio.run(main())
    for a, b in zip(results, sync + seeded):
        assert torch.equal(a, b)


@pytest.mark.parametrize("pair", ["llama"], indirect=True)
@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"do_sample": True, "temperature": 0.0}, "temperature"),
        ({"do_sample": True, "temperature": float("nan")}, "temperature"),
        ({"do_sample": True, "top_p": 1.5}, "top_p"),
        ({"do_sample": True, "top_k": -1}, "top_k"),
        ({"num_beams": 0}, "num_beams"),
        ({"num_beams": 2, "num_return_sequences": 3}, "num_return_sequences"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"no_such_option": 1}, "no_such_option"),
    ],
)
def test_invalid_values_name_the_field(pair, kwargs, field):
    ours, _ = pair
    ids = ours.tokenizer("hi", return_tensors="pt")["input_ids"]
    with pytest.raises(ValueError) as info:
        ours.generate(ids, **kwargs)
    assert isinstance(info.value, InvalidParameterError) and info.value.field == field


@pytest.mark.parametrize("pair", ["llama"], indirect=True)
def test_bad_prompts_are_rejected(pair):
    ours, _ = pair
    with pytest.raises(ValueError, match="input_ids"):
        ours.generate(torch.zeros((1, 0), dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids"):
        ours.generate(torch.tensor([[1, 2, 10**7]]))
    with pytest.raises(ValueError, match="context"):
        ours.generate(torch.ones((1, 600), dtype=torch.long), max_new_tokens=4)


@pytest.mark.parametrize("pair", ["llama"], indirect=True)
@pytest.mark.parametrize("options", [dict(do_sample=False), dict(do_sample=False, min_new_tokens=12)])
def test_streamer_gets_what_transformers_hands_it(pair, options):
    ours, ref = pair
    inputs = ours.tokenizer(PROMPTS[:1], return_tensors="pt")
    expected, got = RecordingStreamer(), RecordingStreamer()
    want = ref.generate(**inputs, max_new_tokens=12, streamer=expected, **options)
    out = ours.generate(inputs["input_ids"], max_new_tokens=12, streamer=got, **options)
    assert torch.equal(out, want)
    assert got.puts == expected.puts and (got.ended, expected.ended) == (1, 1)
    assert len(got.puts) == 1 + out.shape[1] - inputs["input_ids"].shape[1]  # the prompt, then each token


@pytest.mark.parametrize("pair", ["llama"], indirect=True)
def test_text_iterator_streamer_yields_the_generated_text(pair):
    import threading

    ours, _ = pair
    inputs = ours.tokenizer(PROMPTS[:1], return_tensors="pt")
    streamer = transformers.TextIteratorStreamer(ours.tokenizer, skip_prompt=True, timeout=60)
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("out", ours.generate(
        inputs["input_ids"], max_new_tokens=10, min_new_tokens=10, do_sample=False, streamer=streamer)))
    worker.start()
    text = "".join(streamer)
    worker.join(60)
    new = result["out"][0, inputs["input_ids"].shape[1]:]
    assert text == ours.tokenizer.decode(new, skip_special_tokens=True)


@pytest.mark.parametrize("pair", ["llama"], indirect=True)
def test_agenerate_streams_too(pair):
    ours, _ = pair
    inputs = ours.tokenizer(PROMPTS[:1], return_tensors="pt")
    sync, asy = RecordingStreamer(), RecordingStreamer()
    a = ours.generate(inputs["input_ids"], max_new_tokens=8, do_sample=False, streamer=sync)
    b = asyncio.run(ours.agenerate(inputs["input_ids"], max_new_tokens=8, do_sample=False, streamer=asy))
    assert torch.equal(a, b) and sync.puts == asy.puts and asy.ended == 1


@pytest.mark.parametrize("pair", ["llama"], indirect=True)
@pytest.mark.parametrize("options", [dict(num_beams=2), dict(do_sample=True, num_return_sequences=2)])
def test_streamer_refuses_what_transformers_refuses(pair, options):
    ours, _ = pair
    inputs = ours.tokenizer(PROMPTS[:1], return_tensors="pt")
    with pytest.raises(InvalidParameterError) as err:
        ours.generate(inputs["input_ids"], max_new_tokens=4, streamer=RecordingStreamer(), **options)
    assert err.value.field == "streamer"
    two = left_padded(ours.tokenizer, PROMPTS[:2])
    with pytest.raises(InvalidParameterError):
        ours.generate(two["input_ids"], attention_mask=two["attention_mask"], max_new_tokens=4,
                      streamer=RecordingStreamer())
