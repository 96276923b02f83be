"""Our batched processors against transformers' own processor classes, row by row."""

from __future__ import annotations

import random

import pytest
import torch
import transformers
from transformers.generation import logits_process as tp

from engine.params import SamplingParams
from engine.sampling import processors as ours

VOCAB = 48
ROWS = 24


def random_batch(seed: int, ties: bool = False):
    """Random logits and token histories of different lengths (prompt + generated)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(ROWS, VOCAB, generator=gen) * 3
    if ties:  # coarse values, so top-k / top-p boundaries fall on ties
        logits = (logits * 2).round() / 2
    rng = random.Random(seed)
    # Few distinct tokens so that n-grams repeat.
    histories = [[rng.randrange(8) for _ in range(rng.randrange(1, 30))] for _ in range(ROWS)]
    return logits, histories


def theirs_row(processor, history, row_logits):
    return processor(torch.tensor([history]), row_logits.unsqueeze(0).clone())[0]


def assert_rows_equal(actual, expected_rows):
    torch.testing.assert_close(actual, torch.stack(expected_rows), atol=1e-6, rtol=0)


@pytest.mark.parametrize("seed", range(3))
def test_repetition_penalty(seed):
    logits, hist = random_batch(seed)
    rng = random.Random(seed)
    penalties = [rng.choice([1.0, 0.5, 1.3, 2.0, 10.0]) for _ in range(ROWS)]
    out = ours.repetition_penalty(logits, hist, penalties)
    expected = [
        theirs_row(tp.RepetitionPenaltyLogitsProcessor(p), h, row) if p != 1.0 else row
        for p, h, row in zip(penalties, hist, logits)
    ]
    assert_rows_equal(out, expected)
    assert not torch.equal(out, logits)  # the test exercises a change


@pytest.mark.parametrize("seed", range(3))
def test_no_repeat_ngram(seed):
    logits, hist = random_batch(seed)
    rng = random.Random(seed)
    sizes = [rng.choice([0, 1, 2, 3, 4]) for _ in range(ROWS)]
    out = ours.no_repeat_ngram(logits, hist, sizes)
    expected = [
        theirs_row(tp.NoRepeatNGramLogitsProcessor(n), h, row) if n > 0 else row
        for n, h, row in zip(sizes, hist, logits)
    ]
    assert_rows_equal(out, expected)
    assert torch.isinf(out).any()


def test_min_new_tokens():
    logits, hist = random_batch(0)
    rng = random.Random(0)
    eos = [3, 5]
    prompt_lens = [rng.randrange(0, len(h) + 1) for h in hist]
    minimums = [rng.choice([0, 1, 5, 40]) for _ in range(ROWS)]
    generated = [len(h) - p for h, p in zip(hist, prompt_lens)]
    out = ours.min_new_tokens(logits, generated, minimums, [eos] * ROWS)
    expected = [
        theirs_row(tp.MinNewTokensLengthLogitsProcessor(p, m, eos), h, row)
        for p, m, h, row in zip(prompt_lens, minimums, hist, logits)
    ]
    assert_rows_equal(out, expected)
    assert torch.isinf(out).any()


def test_temperature():
    logits, _ = random_batch(1)
    temps = [random.Random(i).choice([1.0, 0.3, 0.7, 1.5, 4.0]) for i in range(ROWS)]
    out = ours.temperature(logits, temps)
    expected = [tp.TemperatureLogitsWarper(t)(None, row.unsqueeze(0))[0] for t, row in zip(temps, logits)]
    assert_rows_equal(out, expected)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("keep", [1, 3])
def test_top_k(ties, keep):
    logits, hist = random_batch(2, ties)
    rng = random.Random(5)
    ks = [rng.choice([0, 1, 2, 5, 20, VOCAB, 1000]) for _ in range(ROWS)]
    out = ours.top_k(logits, ks, keep)
    expected = [
        theirs_row(tp.TopKLogitsWarper(k, min_tokens_to_keep=keep), h, row) if k else row
        for k, h, row in zip(ks, hist, logits)
    ]
    assert_rows_equal(out, expected)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("keep", [1, 3])
def test_top_p(ties, keep):
    logits, hist = random_batch(3, ties)
    rng = random.Random(6)
    ps = [rng.choice([1.0, 1e-6, 0.1, 0.5, 0.9, 0.95, 0.999]) for _ in range(ROWS)]
    # A row already filtered by top-k: top_p then works on -inf entries too.
    logits[0, 10:] = -float("inf")
    ps[0] = 0.8
    out = ours.top_p(logits, ps, keep)
    expected = [
        theirs_row(tp.TopPLogitsWarper(p, min_tokens_to_keep=keep), h, row) if p < 1.0 else row
        for p, h, row in zip(ps, hist, logits)
    ]
    assert_rows_equal(out, expected)


@pytest.mark.parametrize("keep", [1, 3])
def test_min_p(keep):
    logits, hist = random_batch(4)
    rng = random.Random(7)
    mins = [rng.choice([None, 0.0, 0.05, 0.2, 0.9, 1.0]) for _ in range(ROWS)]
    out = ours.min_p(logits, mins, keep)
    expected = [
        theirs_row(tp.MinPLogitsWarper(m, min_tokens_to_keep=keep), h, row) if m is not None else row
        for m, h, row in zip(mins, hist, logits)
    ]
    assert_rows_equal(out, expected)


def test_neutral_rows_are_untouched_bit_for_bit():
    logits, hist = random_batch(8)
    params = [SamplingParams(do_sample=i % 2 == 0, top_k=0) for i in range(ROWS)]
    assert torch.equal(ours.process_logits(logits, params, hist, [0] * ROWS), logits)


@pytest.mark.parametrize("seed", range(40))
def test_may_change_scores_is_false_only_where_every_processor_is_a_no_op(seed):
    """The sampler skips the float32 copy and process_logits where may_change_scores is
    False: the processors must then hand back their input itself, whatever the history."""
    rng = random.Random(seed)
    logits, hist = random_batch(seed)
    params = [random_params(rng, 1) if rng.random() < 0.3 else
              SamplingParams(do_sample=False, min_new_tokens=rng.choice([0, 2, 40]),
                             repetition_penalty=rng.choice([1.0, 1.0, 1.2]), no_repeat_ngram_size=rng.choice([0, 0, 2]))
              for _ in range(ROWS)]
    generated = [rng.randrange(0, 30) for _ in range(ROWS)]
    skipped = 0
    for i in range(ROWS):  # row by row, so that both answers occur
        row, one, n = logits[i : i + 1], [params[i]], [generated[i]]
        if not ours.may_change_scores(one, n):
            skipped += 1
            assert ours.apply_warpers(ours.apply_penalties(row, one, hist[i : i + 1], n), one) is row
    assert 0 < skipped < ROWS


# ---- the whole chain against GenerationMixin._get_logits_processor ------------------------------


@pytest.fixture(scope="module")
def tiny_model():
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, eos_token_id=3, bos_token_id=1,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def random_params(rng: random.Random, num_beams: int) -> SamplingParams:
    return SamplingParams(
        do_sample=rng.random() < 0.7,
        temperature=rng.choice([1.0, 0.5, 1.7]),
        top_k=rng.choice([0, 1, 4, 50]),
        top_p=rng.choice([1.0, 0.6, 0.95]),
        min_p=rng.choice([None, 0.1]),
        repetition_penalty=rng.choice([1.0, 1.4]),
        no_repeat_ngram_size=rng.choice([0, 2, 3]),
        min_new_tokens=rng.choice([0, 3, 10]),
        eos_token_ids=tuple(rng.sample(range(VOCAB), rng.choice([1, 2]))),
        num_beams=num_beams,
    )


def transformers_chain(model, p: SamplingParams, prompt_len: int):
    gc = transformers.GenerationConfig(
        do_sample=p.do_sample, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p,
        repetition_penalty=p.repetition_penalty, no_repeat_ngram_size=p.no_repeat_ngram_size,
        min_new_tokens=p.min_new_tokens, min_length=0, eos_token_id=list(p.eos_token_ids),
        num_beams=p.num_beams,
    )  # fmt: skip
    model._prepare_special_tokens(gc, device="cpu")
    return model._get_logits_processor(
        generation_config=gc,
        input_ids_seq_length=prompt_len,
        logits_processor=transformers.LogitsProcessorList(),
        device="cpu",
    )


@pytest.mark.parametrize("num_beams", [1, 3])
def test_full_chain_matches_transformers(tiny_model, num_beams):
    rng = random.Random(num_beams)
    logits, hist = random_batch(10 + num_beams)
    params = [random_params(rng, num_beams) for _ in range(ROWS)]
    # transformers warns (and changes nothing) with an empty prompt; keep one token.
    prompt_lens = [rng.randrange(1, len(h) + 1) for h in hist]
    generated = [len(h) - n for h, n in zip(hist, prompt_lens)]
    # Beam sampling keeps #eos + 1 tokens in its warpers; plain sampling keeps 1.
    keeps = [len(p.eos_token_ids) + 1 if num_beams > 1 else 1 for p in params]
    expected = [
        theirs_row(transformers_chain(tiny_model, p, n), h, row)
        for p, n, h, row in zip(params, prompt_lens, hist, logits)
    ]
    actual = [
        ours.process_logits(logits[i : i + 1], [params[i]], [hist[i]], [generated[i]], keeps[i])[0] for i in range(ROWS)
    ]
    assert_rows_equal(torch.stack(actual), expected)
    if num_beams == 1:  # and batched, with per-row params, for the sampler's path
        assert_rows_equal(ours.process_logits(logits, params, hist, generated), expected)
