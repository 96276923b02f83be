"""Logits processors with transformers 5.17's semantics, batched over rows with per-row params.

Order (transformers' `GenerationMixin._get_logits_processor`, restricted to what we
support): repetition_penalty, no_repeat_ngram_size, min_new_tokens/min_length
(together: "mask the stop ids until enough new tokens"), and then, for sampling rows
only, the former warpers: temperature, top_k, top_p, min_p.

Every function takes `scores` as a [rows, vocab] float32 tensor and returns the
processed scores without modifying its input (the caller keeps its raw logits for
logprobs); when nothing applies it may return the input itself. Per-row
parameters arrive as Python lists, so which rows need a step is decided on the host
without reading anything back from the device; the parameters then travel to the
device as one small tensor each.

Exactness notes (tested against transformers' own classes):
* a row whose parameter is neutral is skipped rather than processed with a neutral
  value, so it stays bit-identical to transformers not adding that processor;
* thresholds are computed as transformers does (float32 scores against a float32
  copy of the Python-float parameter), so keep/remove decisions at the boundary agree;
* top_p sorts ascending and accumulates from the least likely token, as transformers
  does; accumulating the other way rounds differently and can flip a boundary token.
"""

from __future__ import annotations

from typing import Sequence

import torch

from engine.params import SamplingParams
from engine.transfer import to_device

FILTER_VALUE = -float("inf")


def _rows_tensor(rows: list[int], device: torch.device) -> torch.Tensor:
    return to_device(rows, torch.long, device)


def _column(values: list[float], scores: torch.Tensor) -> torch.Tensor:
    """Per-row float32 parameters as a [rows, 1] column on the scores' device."""
    return to_device(values, torch.float32, scores.device).unsqueeze(1)


def _mask_pairs(scores: torch.Tensor, pairs: list[tuple[int, int]]) -> torch.Tensor:
    """Set scores[row, token] to -inf for each pair (one scatter, not one per token)."""
    if not pairs:
        return scores
    rows, tokens = zip(*pairs)
    out = scores.clone()
    index = (_rows_tensor(list(rows), scores.device), _rows_tensor(list(tokens), scores.device))
    out.index_put_(index, torch.full((), FILTER_VALUE, dtype=scores.dtype, device=scores.device))
    return out


# ---- processors applied to every row ----------------------------------------------------


def repetition_penalty(
    scores: torch.Tensor, token_ids: Sequence[Sequence[int]], penalties: Sequence[float]
) -> torch.Tensor:
    """Every token present in a row's token_ids (prompt included): negative scores are
    multiplied by the penalty, others divided (CTRL's rule, as transformers)."""
    rows = [i for i, p in enumerate(penalties) if p != 1.0]
    if not rows:
        return scores
    vocab = scores.shape[1]
    width = max(1, max(len(token_ids[i]) for i in rows))
    # Padded token matrix; padding and any id past the vocab land in a spare column.
    ids = torch.full((len(rows), width), vocab, dtype=torch.long)
    for j, i in enumerate(rows):
        if token_ids[i]:
            ids[j, : len(token_ids[i])] = torch.as_tensor(token_ids[i], dtype=torch.long)
    ids = to_device(ids, torch.long, scores.device).clamp_(max=vocab)
    seen = torch.zeros((len(rows), vocab + 1), dtype=torch.bool, device=scores.device)
    seen.scatter_(1, ids, True)
    seen = seen[:, :vocab]

    index = _rows_tensor(rows, scores.device)
    sub = scores.index_select(0, index)
    penalty = _column([penalties[i] for i in rows], scores)
    penalized = torch.where(sub < 0, sub * penalty, sub / penalty)
    return scores.index_copy(0, index, torch.where(seen, penalized, sub))


def banned_ngram_tokens(tokens: Sequence[int], n: int) -> set[int]:
    """Tokens that would complete an n-gram already present in `tokens`.

    Every window of n tokens whose first n-1 equal the current last n-1 tokens bans
    its n-th token (n = 1: every token seen so far is banned)."""
    length = len(tokens)
    if n <= 0 or length < n:
        return set()
    tokens = list(tokens)
    prefix = tokens[length - n + 1 :]
    return {tokens[start + n - 1] for start in range(length - n + 1) if tokens[start : start + n - 1] == prefix}


def no_repeat_ngram(scores: torch.Tensor, token_ids: Sequence[Sequence[int]], sizes: Sequence[int]) -> torch.Tensor:
    vocab = scores.shape[1]
    pairs = [(i, t) for i, n in enumerate(sizes) if n > 0 for t in banned_ngram_tokens(token_ids[i], n) if t < vocab]
    return _mask_pairs(scores, pairs)


def min_new_tokens(
    scores: torch.Tensor,
    num_generated: Sequence[int],
    minimums: Sequence[int],
    stop_ids: Sequence[Sequence[int]],
) -> torch.Tensor:
    """Forbid a row's stop ids while it has generated fewer than its minimum."""
    vocab = scores.shape[1]
    pairs = [
        (i, t)
        for i, (done, minimum) in enumerate(zip(num_generated, minimums))
        if done < minimum
        for t in stop_ids[i]
        if t < vocab
    ]
    return _mask_pairs(scores, pairs)


# ---- warpers: sampling rows only ------------------------------------------------------------


def temperature(scores: torch.Tensor, temperatures: Sequence[float]) -> torch.Tensor:
    if all(t == 1.0 for t in temperatures):
        return scores
    return scores / _column(list(temperatures), scores)


def top_k(scores: torch.Tensor, ks: Sequence[int], min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Keep each row's k best scores (and any tied with the k-th); k = 0 disables.

    As transformers: k is raised to min_tokens_to_keep, then clamped to the vocab."""
    vocab = scores.shape[1]
    rows = [i for i, k in enumerate(ks) if k != 0]
    if not rows:
        return scores
    k_eff = [min(max(ks[i], min_tokens_to_keep), vocab) for i in rows]
    index = _rows_tensor(rows, scores.device)
    sub = scores.index_select(0, index)
    # One topk at the largest k; each row reads its own k-th value from it.
    best = torch.topk(sub, max(k_eff), dim=-1).values
    kth = best.gather(1, to_device(k_eff, torch.long, scores.device).unsqueeze(1) - 1)
    return scores.index_copy(0, index, sub.masked_fill(sub < kth, FILTER_VALUE))


def top_p(scores: torch.Tensor, ps: Sequence[float], min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Nucleus: drop the least likely tokens whose total probability is <= 1 - p;
    the min_tokens_to_keep most likely always stay. p = 1 disables."""
    rows = [i for i, p in enumerate(ps) if p < 1.0]
    if not rows:
        return scores
    index = _rows_tensor(rows, scores.device)
    sub = scores.index_select(0, index)
    ascending, order = torch.sort(sub, descending=False)
    mass_below = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = mass_below <= _column([1.0 - ps[i] for i in rows], scores)
    drop_sorted[:, -min_tokens_to_keep:] = False
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return scores.index_copy(0, index, sub.masked_fill(drop, FILTER_VALUE))


def min_p(scores: torch.Tensor, mins: Sequence[float | None], min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Drop tokens less likely than min_p times the most likely one; None disables."""
    rows = [i for i, m in enumerate(mins) if m is not None]
    if not rows:
        return scores
    index = _rows_tensor(rows, scores.device)
    sub = scores.index_select(0, index)
    probs = sub.softmax(dim=-1)
    threshold = _column([mins[i] for i in rows], scores) * probs.amax(dim=-1, keepdim=True)
    drop = probs < threshold
    keep = torch.topk(probs, min(min_tokens_to_keep, probs.shape[-1]), dim=-1).indices
    drop.scatter_(1, keep, False)
    return scores.index_copy(0, index, sub.masked_fill(drop, FILTER_VALUE))


# ---- the whole chain --------------------------------------------------------------------------


def stop_ids_for_min_tokens(params: SamplingParams) -> list[int]:
    """Ids masked until min_new_tokens: whatever would end the sequence (eos unless
    ignore_eos, plus stop_token_ids). Without our extras this is transformers' eos set."""
    return list(params.sorted_stop_token_ids)


def apply_penalties(
    scores: torch.Tensor,
    params: Sequence[SamplingParams],
    token_ids: Sequence[Sequence[int]],
    num_generated: Sequence[int],
) -> torch.Tensor:
    """The processors transformers applies in every decoding mode (greedy, sampling, beams)."""
    scores = repetition_penalty(scores, token_ids, [p.repetition_penalty for p in params])
    scores = no_repeat_ngram(scores, token_ids, [p.no_repeat_ngram_size for p in params])
    needs_min = [p.min_new_tokens > n for p, n in zip(params, num_generated)]
    if any(needs_min):
        stop_ids = [stop_ids_for_min_tokens(p) if need else [] for p, need in zip(params, needs_min)]
        scores = min_new_tokens(scores, num_generated, [p.min_new_tokens for p in params], stop_ids)
    return scores


def apply_warpers(scores: torch.Tensor, params: Sequence[SamplingParams], min_tokens_to_keep: int = 1) -> torch.Tensor:
    """temperature, top_k, top_p, min_p on the rows that sample; other rows untouched.

    min_tokens_to_keep is 1 for plain sampling; beam sampling keeps (#eos + 1)."""
    sampling = [p.do_sample for p in params]
    if not any(sampling):
        return scores
    scores = temperature(scores, [p.temperature if s else 1.0 for p, s in zip(params, sampling)])
    scores = top_k(scores, [p.top_k if s else 0 for p, s in zip(params, sampling)], min_tokens_to_keep)
    scores = top_p(scores, [p.top_p if s else 1.0 for p, s in zip(params, sampling)], min_tokens_to_keep)
    scores = min_p(scores, [p.min_p if s else None for p, s in zip(params, sampling)], min_tokens_to_keep)
    return scores


def may_change_scores(params: Sequence[SamplingParams], num_generated: Sequence[int]) -> bool:
    """False when process_logits would hand back its input unchanged (the same tensor)
    whatever the tokens: no row samples, penalizes repeats, bans n-grams, or still waits
    for its min_new_tokens (each processor returns its input when it has nothing to do)."""
    return any(p.do_sample or p.repetition_penalty != 1.0 or p.no_repeat_ngram_size > 0 or p.min_new_tokens > n
               for p, n in zip(params, num_generated))


def process_logits(
    scores: torch.Tensor,
    params: Sequence[SamplingParams],
    token_ids: Sequence[Sequence[int]],
    num_generated: Sequence[int],
    min_tokens_to_keep: int = 1,
) -> torch.Tensor:
    """transformers' full processor list for each row: what its argmax or draw sees.

    token_ids: each row's prompt + generated tokens (transformers' input_ids);
    num_generated: how many of those were generated (for min_new_tokens)."""
    scores = apply_penalties(scores, params, token_ids, num_generated)
    return apply_warpers(scores, params, min_tokens_to_keep)
