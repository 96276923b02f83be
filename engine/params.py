"""Per-request generation parameters, resolved and validated.

`SamplingParams` is the engine's own, immutable view of a transformers
`GenerationConfig`: every field keeps transformers' name and meaning.
`engine.generation_config.resolve_sampling_params` builds it from the model's
defaults plus user overrides and raises `ValueError` naming the bad field.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 20
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50  # transformers' default; 0 disables
    top_p: float = 1.0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    # transformers accepts True, False or "never".
    early_stopping: bool | str = False
    num_return_sequences: int = 1
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    # Extra token ids that end a sequence like EOS does (the API's stop_token_ids).
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    # Per-token logprobs of the chosen token, plus this many top alternatives (None: off).
    logprobs: int | None = None
    # Produce text deltas alongside token ids. generate(), which returns token ids only,
    # turns it off and saves the step loop the incremental detokenizing; stop strings
    # are matched on text, so they keep the detokenizer on whatever this says.
    detokenize: bool = True
    # Deliver one RequestOutput, when the request finishes, instead of one per step with
    # that step's tokens. generate() does not stream, so it asks for this and spares the
    # step loop building and handing over an output per request and step.
    final_output_only: bool = False

    @property
    def use_beam_search(self) -> bool:
        return self.num_beams > 1

    @property
    def num_sequences(self) -> int:
        """How many sequences the request runs in the batch once its prompt is prefilled."""
        return self.num_beams if self.use_beam_search else self.num_return_sequences

    @functools.cached_property  # asked per sequence and step; the params never change
    def reads_history(self) -> bool:
        """Whether choosing a token reads the tokens before it (penalties on the history)."""
        return self.repetition_penalty != 1.0 or self.no_repeat_ngram_size > 0

    @functools.cached_property
    def needs_text(self) -> bool:
        return self.detokenize or bool(self.stop_strings)

    @functools.cached_property
    def all_stop_token_ids(self) -> frozenset[int]:
        ids = set(self.stop_token_ids)
        if not self.ignore_eos:
            ids.update(self.eos_token_ids)
        return frozenset(ids)

    @functools.cached_property  # asked per sequence and step while min_new_tokens holds
    def sorted_stop_token_ids(self) -> tuple[int, ...]:
        return tuple(sorted(self.all_stop_token_ids))


@dataclass
class GenerationRequest:
    """What a caller submits to the engine: a prompt and how to continue it."""

    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str | None = None  # the engine assigns one when None
