"""Sampler: greedy, seeded reproducibility, the sampled distribution, logprobs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from transformers.generation import logits_process as tp

from engine.params import SamplingParams
from engine.sampling.sampler import Sampler, SampleRow, make_generator

VOCAB = 8
DRAWS = 20_000
# Fixed logits of a small vocabulary, distinct enough that every filter bites.
LOGITS = torch.tensor([2.0, 1.5, 1.2, 0.9, 0.3, 0.0, -0.4, -1.0])


def row(params: SamplingParams, generator=None, token_ids=(0,), num_generated=0) -> SampleRow:
    return SampleRow(params, list(token_ids), num_generated, generator)


def test_top_k_1_sampling_equals_greedy():
    logits = torch.randn(64, 100, generator=torch.Generator().manual_seed(0))
    sampled = Sampler().sample(
        logits,
        [row(SamplingParams(do_sample=True, top_k=1, temperature=1.7), make_generator(i, 0, "cpu")) for i in range(64)],
    )
    greedy = Sampler().sample(logits, [row(SamplingParams()) for _ in range(64)])
    assert [r.token_id for r in sampled] == [r.token_id for r in greedy] == logits.argmax(-1).tolist()


def test_min_tokens_bans_for_the_fused_greedy_kernel(monkeypatch):
    """The stop ids each row may not choose yet, as the CUDA greedy kernel takes them
    (its kernel module stands in here: no Triton on the CPU): one list kept for rows that
    share it, a row each otherwise (-1 pads), nothing once no row waits."""
    import sys
    import types

    monkeypatch.setitem(sys.modules, "engine.runtime.cuda.kernels", types.SimpleNamespace(GREEDY_BANS=8))
    sampler, cpu = Sampler(), torch.device("cpu")
    waiting = SamplingParams(min_new_tokens=4, eos_token_ids=(9, 2), stop_token_ids=(5,))
    shared = sampler._min_tokens_bans([waiting, waiting], [0, 3], cpu)
    assert shared.tolist() == [2, 5, 9, -1, -1, -1, -1, -1]
    assert sampler._min_tokens_bans([waiting], [1], cpu) is shared  # kept, not copied again
    assert sampler._min_tokens_bans([waiting, waiting], [4, 7], cpu) is None  # both past their minimum
    assert sampler._min_tokens_bans([SamplingParams(), SamplingParams()], [0, 0], cpu) is None
    ignoring = SamplingParams(min_new_tokens=4, eos_token_ids=(9,), ignore_eos=True)
    assert sampler._min_tokens_bans([ignoring], [0], cpu) is None  # nothing would end it
    many = SamplingParams(min_new_tokens=4, eos_token_ids=tuple(range(10, 19)))
    rows = sampler._min_tokens_bans([waiting, SamplingParams(), many, waiting], [0, 0, 1, 4], cpu)
    assert rows.tolist() == [[2, 5, 9] + [-1] * 13, [-1] * 16, list(range(10, 19)) + [-1] * 7, [-1] * 16]


def test_greedy_applies_the_penalties():
    logits = torch.tensor([[3.0, 2.9, 2.0, -1.0]])
    history = [0, 0, 1]
    penalized = tp.RepetitionPenaltyLogitsProcessor(2.0)(torch.tensor([history]), logits.clone())
    [result] = Sampler().sample(logits, [row(SamplingParams(repetition_penalty=2.0), token_ids=history)])
    assert result.token_id == int(penalized.argmax()) == 2  # 0 and 1 were both seen; 2 wins
    [masked] = Sampler().sample(
        logits, [row(SamplingParams(min_new_tokens=2, eos_token_ids=(0,)), token_ids=[3], num_generated=1)]
    )
    assert masked.token_id == 1  # eos is forbidden before min_new_tokens


def draw_steps(batch_rows_fn, steps: int, logits_fn):
    """Run `steps` sampling steps; batch_rows_fn(step) -> (rows, index of the row we follow)."""
    sampler = Sampler()
    tokens = []
    for step in range(steps):
        rows, mine = batch_rows_fn(step)
        results = sampler.sample(logits_fn(len(rows), step), rows)
        tokens.append(results[mine].token_id)
    return tokens


def test_seeded_row_is_independent_of_its_batch():
    params = SamplingParams(do_sample=True, temperature=1.3, top_k=0)
    vocab = 50
    base = torch.randn(vocab, generator=torch.Generator().manual_seed(1))

    def logits_fn(n, step):
        return (base + step * 0.01).expand(n, vocab).clone()

    def alone_with(generator):
        return draw_steps(lambda step: ([row(params, generator)], 0), 30, logits_fn)

    alone = alone_with(make_generator(1234, 0, "cpu"))

    mine_gen = make_generator(1234, 0, "cpu")
    others = [make_generator(99, k, "cpu") for k in range(3)]

    def crowded(step):
        # Neighbours differ step to step: greedy, unseeded, seeded, other params; our row moves.
        neighbours = [
            row(SamplingParams()),
            row(SamplingParams(do_sample=True)),
            row(SamplingParams(do_sample=True, top_p=0.5), others[step % 3]),
            row(SamplingParams(do_sample=True, temperature=0.5), None),
        ][: 1 + step % 4]
        at = step % (len(neighbours) + 1)
        return neighbours[:at] + [row(params, mine_gen)] + neighbours[at:], at

    assert draw_steps(crowded, 30, logits_fn) == alone
    # And the stream really is the seed's: another seed, or another index, differs.
    assert alone_with(make_generator(1235, 0, "cpu")) != alone
    assert alone_with(make_generator(1234, 1, "cpu")) != alone


# ---- the sampled distribution -----------------------------------------------------------------


def transformers_probs(warpers) -> np.ndarray:
    """The target distribution, built with transformers' own warpers (independent of ours)."""
    scores = LOGITS.unsqueeze(0).clone()
    for w in warpers:
        scores = w(None, scores)
    return scores.softmax(-1)[0].double().numpy()


def sample_counts(params: SamplingParams, seeded: bool) -> np.ndarray:
    torch.manual_seed(0)  # the unseeded path draws from torch's global generator
    rows = [row(params, make_generator(7, i, "cpu") if seeded else None) for i in range(DRAWS)]
    results = Sampler().sample(LOGITS.expand(DRAWS, VOCAB), rows)
    return np.bincount([r.token_id for r in results], minlength=VOCAB)


def goodness_of_fit(counts: np.ndarray, probs: np.ndarray) -> float:
    """p-value of a chi-square test; tokens the target excludes must never be drawn."""
    kept = probs > 0
    assert counts[~kept].sum() == 0, f"drew filtered tokens: {counts}"
    return chisquare(counts[kept], probs[kept] / probs[kept].sum() * counts.sum()).pvalue


CASES = {
    "temperature": (dict(temperature=0.7, top_k=0), [tp.TemperatureLogitsWarper(0.7)]),
    "default_top_k_50": (dict(), []),
    "top_k": (dict(top_k=3), [tp.TopKLogitsWarper(3)]),
    "top_p": (dict(top_p=0.8, top_k=0), [tp.TopPLogitsWarper(0.8)]),
    "min_p": (dict(min_p=0.3, top_k=0), [tp.MinPLogitsWarper(0.3)]),
    "all": (
        dict(temperature=1.5, top_k=6, top_p=0.9, min_p=0.1),
        [tp.TemperatureLogitsWarper(1.5), tp.TopKLogitsWarper(6), tp.TopPLogitsWarper(0.9), tp.MinPLogitsWarper(0.1)],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sampled_frequencies_follow_the_processed_distribution(case):
    kwargs, warpers = CASES[case]
    counts = sample_counts(SamplingParams(do_sample=True, **kwargs), seeded=False)
    assert goodness_of_fit(counts, transformers_probs(warpers)) > 1e-3


def test_seeded_streams_follow_the_distribution_too():
    # One generator per row (20,000 make_generator streams): they must be independent.
    counts = sample_counts(SamplingParams(do_sample=True, top_p=0.9, top_k=0), seeded=True)
    assert goodness_of_fit(counts, transformers_probs([tp.TopPLogitsWarper(0.9)])) > 1e-3


def test_negative_control_detects_a_wrong_distribution():
    counts = sample_counts(SamplingParams(do_sample=True, temperature=0.7, top_k=0), seeded=False)
    # Slightly wrong targets: the test must reject them, or it proves nothing above.
    assert goodness_of_fit(counts, transformers_probs([tp.TemperatureLogitsWarper(0.8)])) < 1e-6
    assert goodness_of_fit(counts, transformers_probs([])) < 1e-6
    # And a sampler whose filter is off (top_k ignored) draws tokens the target excludes.
    with pytest.raises(AssertionError, match="filtered"):
        goodness_of_fit(counts, transformers_probs([tp.TemperatureLogitsWarper(0.7), tp.TopKLogitsWarper(3)]))


# ---- logprobs --------------------------------------------------------------------------------------


def test_logprobs_come_from_the_raw_logits():
    logits = torch.randn(3, 30, generator=torch.Generator().manual_seed(3))
    raw = torch.log_softmax(logits, -1)
    rows = [
        row(SamplingParams(do_sample=True, temperature=0.3, top_k=5, logprobs=4), make_generator(0, 0, "cpu")),
        row(SamplingParams(repetition_penalty=3.0, logprobs=0), token_ids=list(range(30))),
        row(SamplingParams()),
    ]
    results = Sampler().sample(logits, rows)
    for i, r in enumerate(results):
        assert r.logprob == pytest.approx(float(raw[i, r.token_id]), abs=1e-6)
    best = torch.topk(raw[0], 4)
    assert [t for t, _ in results[0].top_logprobs] == best.indices.tolist()
    assert [lp for _, lp in results[0].top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-6)
    assert results[1].top_logprobs == () and results[2].top_logprobs == ()


def test_make_generator_streams():
    a = torch.rand(4, generator=make_generator(5, 0, "cpu"))
    assert torch.equal(a, torch.rand(4, generator=make_generator(5, 0, "cpu")))
    assert not torch.equal(a, torch.rand(4, generator=make_generator(5, 1, "cpu")))
    assert not torch.equal(a, torch.rand(4, generator=make_generator(6, 0, "cpu")))
    assert not torch.equal(
        torch.rand(4, generator=make_generator(None, 0, "cpu")), torch.rand(4, generator=make_generator(None, 0, "cpu"))
    )
