"""Beam search for one request, step by step, with transformers 5.17's `_beam_search` semantics.

The engine runs the model; this class only decides. Each step it gets the raw logits of
the running beams and answers which beam each new running beam extends (`parents`) and
with which token, so the engine can re-parent (fork) the beams' KV sequences.

transformers' algorithm, per step (t = tokens generated so far, B = num_beams):
1. log_softmax the logits, then apply the logits processors to the log-probs (the
   warpers too when beam *sampling*, keeping #eos + 1 tokens), and add each beam's
   running score.
2. Over all B * vocab continuations keep K = max(2, 1 + #eos) * B candidates: the
   top K, or K drawn without replacement when sampling. K > B guarantees B candidates
   that do not end, even if the best ones all hit eos.
3. A candidate "hits" if it ends with an eos id, reaches max_new_tokens, or trips a
   stop check. The B best non-hitting candidates (hits get -1e9) become the running beams.
4. Among the first B candidates (only those), hits become finished hypotheses, scored
   sum(log-probs) / (t + 1) ** length_penalty, i.e. by their generated length eos
   included. Finished hypotheses keep the B best ever seen.
5. Stop when no running beam can still beat the worst finished one (the heuristic
   depends on early_stopping), when early_stopping is True and B hypotheses are
   finished, or when every candidate hit (max length).

transformers starts with B identical prompt rows scored 0, -1e9, -1e9, ... We start
with one live beam and replicate its processed log-probs B times in the first step, so
the arithmetic (the -1e9 rows included) and thus every choice is the same.

Scores and the finished-hypothesis bookkeeping are float32 tensors on the host: the
same float32 operations as transformers, so ties and roundings agree, with one
device -> host transfer per step (the parents and tokens are needed there anyway).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from engine.params import SamplingParams
from engine.sampling.processors import apply_penalties, apply_warpers
from engine.sampling.sampler import make_generator

# transformers' stand-in for an impossible score.
_NEG = -1.0e9


def _length_norm(length: int, length_penalty: float) -> float:
    """length ** length_penalty, as transformers computes it; inf where that overflows."""
    try:
        return length**length_penalty
    except OverflowError:  # only for length > 1 and a huge positive penalty
        return float("inf")


@dataclass(frozen=True)
class BeamStep:
    parents: list[int]  # for each new running beam k, the index (in live_beams) of the beam it extends
    tokens: list[int]  # the token appended to beam k
    done: bool


@dataclass(frozen=True)
class BeamHypothesis:
    token_ids: list[int]  # generated tokens only, the final eos included when it ended on one
    score: float  # transformers' sequences_scores


class BeamSearch:
    def __init__(
        self,
        params: SamplingParams,
        prompt_token_ids: list[int],
        max_new_tokens: int,
        *,
        generator: torch.Generator | None = None,
        stop_checker: Callable[[list[int]], bool] | None = None,
    ):
        """generator: for beam sampling (do_sample); None derives one from params.seed.
        stop_checker(generated_token_ids) -> True when a candidate ends (stop strings)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.params = params
        self._prompt = list(prompt_token_ids)
        self._max_new = max_new_tokens
        self._generator = generator
        self._stop_checker = stop_checker
        self._stop_ids = params.all_stop_token_ids
        num_beams = params.num_beams
        n_eos = len(self._stop_ids)
        self._num_candidates = max(2, 1 + n_eos) * num_beams
        # transformers' min_tokens_to_keep for the warpers of beam sampling.
        self._min_tokens_to_keep = n_eos + 1 if n_eos else 2

        self._running: list[list[int]] = [[]]
        self._running_scores = torch.tensor([0.0] + [_NEG] * (num_beams - 1), dtype=torch.float32)
        self._finished: list[list[int] | None] = [None] * num_beams
        self._finished_scores = torch.full((num_beams,), _NEG, dtype=torch.float32)
        self._is_finished = [False] * num_beams
        # transformers' is_early_stop_heuristic_unsatisfied: a running beam may still improve.
        self._improvable = True
        self._num_generated = 0
        self._done = False

    @property
    def live_beams(self) -> list[list[int]]:
        """Generated tokens of each running beam, in the order step() wants their logits."""
        return [list(beam) for beam in self._running]

    @property
    def num_generated(self) -> int:
        return self._num_generated

    @property
    def done(self) -> bool:
        return self._done

    def step(self, logits: torch.Tensor) -> BeamStep:
        """logits: [len(live_beams), vocab], the raw next-token logits of each live beam."""
        if self._done:
            raise RuntimeError("beam search is done")
        if logits.dim() != 2 or logits.shape[0] != len(self._running):
            raise ValueError(f"expected logits for {len(self._running)} beams, got shape {tuple(logits.shape)}")
        p = self.params
        num_beams, vocab = p.num_beams, logits.shape[1]
        first = self._num_generated == 0
        t = self._num_generated

        # 1. Processed log-probs plus running scores, flattened over (beam, token).
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        rows = [p] * len(self._running)
        sequences = [self._prompt + beam for beam in self._running]
        log_probs = apply_penalties(log_probs, rows, sequences, [t] * len(rows))
        log_probs = apply_warpers(log_probs, rows, self._min_tokens_to_keep)
        if first:
            log_probs = log_probs.expand(num_beams, vocab)
        accumulated = log_probs + self._running_scores.to(logits.device).unsqueeze(1)
        accumulated = accumulated.reshape(1, num_beams * vocab)

        # 2. K candidates.
        if p.do_sample:
            if self._generator is None:
                self._generator = make_generator(p.seed, 0, logits.device)
            flat_index = torch.multinomial(accumulated.softmax(dim=-1), self._num_candidates, generator=self._generator)
            values = accumulated.gather(1, flat_index)
        else:
            values, flat_index = torch.topk(accumulated, self._num_candidates)
        values = values[0].cpu()
        flat = flat_index[0].tolist()
        beam_of = [0 if first else i // vocab for i in flat]  # all first-step rows are the one live beam
        token_of = [i % vocab for i in flat]
        candidates = [self._running[b] + [tok] for b, tok in zip(beam_of, token_of)]

        # 3. Which candidates end here, and the next running beams.
        hits = [self._ends(c) for c in candidates]
        hit_mask = torch.tensor(hits, dtype=torch.bool)
        running_values = values + hit_mask.to(torch.float32) * _NEG
        keep = torch.topk(running_values, num_beams).indices.tolist()
        self._running = [candidates[j] for j in keep]
        self._running_scores = running_values[keep]

        # 4. Finished hypotheses.
        self._update_finished(values, candidates, hit_mask)

        # 5. Stop test.
        self._num_generated = t + 1
        self._update_improvable()
        all_finished_early = all(self._is_finished) and p.early_stopping is True
        self._done = not (self._improvable and not all_finished_early and not all(hits))
        return BeamStep(parents=[beam_of[j] for j in keep], tokens=[token_of[j] for j in keep], done=self._done)

    def _ends(self, generated: list[int]) -> bool:
        if len(generated) >= self._max_new or generated[-1] in self._stop_ids:
            return True
        return self._stop_checker is not None and self._stop_checker(generated)

    def _update_finished(self, values: torch.Tensor, candidates: list[list[int]], hit_mask: torch.Tensor) -> None:
        p = self.params
        num_beams = p.num_beams
        # Only the first B candidates may become hypotheses; the rest only back up the running beams.
        just_finished = hit_mask.clone()
        just_finished[num_beams:] = False
        scores = values / _length_norm(self._num_generated + 1, p.length_penalty)
        # transformers also sinks these scores when the batch item is already complete
        # (early_stopping True and B finished, or no improvement possible). For a single
        # request either condition has ended the search before this step, so never here.
        scores = scores + (~just_finished).to(torch.float32) * _NEG

        merged_scores = torch.cat((self._finished_scores, scores))
        merged = self._finished + candidates
        merged_flags = self._is_finished + just_finished.tolist()
        best = torch.topk(merged_scores, num_beams).indices.tolist()
        self._finished = [merged[i] for i in best]
        self._finished_scores = merged_scores[best]
        self._is_finished = [merged_flags[i] for i in best]

    def _update_improvable(self) -> None:
        """Can the best running beam still beat the worst finished hypothesis?

        early_stopping False (and "never" with length_penalty <= 0) assumes the best
        running beam's score at its current length; "never" with a positive
        length_penalty assumes it could reach max length (transformers' heuristic)."""
        p = self.params
        if p.early_stopping == "never" and p.length_penalty > 0.0:
            best_length = self._max_new
        else:
            best_length = self._num_generated
        best_possible = self._running_scores[:1] / _length_norm(best_length, p.length_penalty)
        worst = torch.where(
            torch.tensor(self._is_finished), self._finished_scores.min(), torch.tensor(_NEG, dtype=torch.float32)
        )
        self._improvable = self._improvable and bool((best_possible > worst).any())

    def finalize(self) -> list[BeamHypothesis]:
        """The num_return_sequences best finished hypotheses, best first (transformers' order).

        An extreme length_penalty can sink every finished score below the -1e9 stand-in,
        so that nothing counts as finished; the best running beams then fill the answer,
        which always holds num_return_sequences sequences."""
        if not self._done:
            raise RuntimeError("beam search has not finished")
        top = range(self.params.num_return_sequences)
        found = [
            BeamHypothesis(list(self._finished[i]), float(self._finished_scores[i]))
            for i in top
            if self._is_finished[i]
        ]
        missing = self.params.num_return_sequences - len(found)
        found += [
            BeamHypothesis(list(beam), float(score))
            for beam, score in zip(self._running[:missing], self._running_scores[:missing].tolist())
        ]
        return found
