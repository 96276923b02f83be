"""The engine's mutable request state. Only the scheduler's update step changes it.

A Request holds one or more Sequences: one while its prompt is prefilled, then
`params.num_sequences` of them (beams, or num_return_sequences samples) that share
the prompt's KV blocks.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from engine.block_manager import BlockTable
from engine.outputs import FinishReason, TokenLogprob
from engine.params import SamplingParams

_seq_ids = itertools.count()


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    index: int  # which output of the request it is
    token_ids: list[int]  # prompt + generated
    prompt_len: int
    num_computed: int = 0  # tokens whose KV is in the cache (or being written by a launched step)
    # Tokens sampled by a launched step whose ids the host has not read back yet (0 or 1).
    # The next step can already feed such a token from the device (engine/llm_engine.py).
    num_inflight: int = 0
    table: BlockTable = field(default_factory=BlockTable)
    finish_reason: FinishReason | None = None
    cumulative_logprob: float = 0.0
    logprobs: list[TokenLogprob] | None = None
    detokenizer: Any = None  # engine.detokenizer.IncrementalDetokenizer
    generator: Any = None  # torch.Generator for seeded sampling
    # What the last update produced, for the next RequestOutput.
    new_token_ids: list[int] = field(default_factory=list)
    new_text: str = ""
    new_logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reported: bool = False
    seq_id: int = field(default_factory=lambda: next(_seq_ids))

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def num_pending(self) -> int:
        """Tokens not yet in the KV cache (the prompt remainder, or the last sampled token)."""
        return len(self.token_ids) + self.num_inflight - self.num_computed

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def generated_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    # Called from the step loop with each RequestOutput for this request.
    sink: Callable[[Any], None]
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    seqs: list[Sequence] = field(default_factory=list)
    beam_search: Any = None  # engine.sampling.beam_search.BeamSearch
    # Prompt tokens served from the prefix cache at the first schedule.
    num_cached_tokens: int = 0
    # True once the prompt is prefilled and the request runs params.num_sequences sequences.
    forked: bool = False
    # One seeded generator per output sequence (None entries when unseeded and greedy).
    generators: list = field(default_factory=list)
    first_scheduled_time: float | None = None
    num_preemptions: int = 0
    error: str | None = None
    # Tokens of the returned beams, once beam search has finished.
    beam_completion_tokens: int | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def live_seqs(self) -> list[Sequence]:
        return [s for s in self.seqs if s.finish_reason is None]

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def num_completion_tokens(self) -> int:
        if len(self.seqs) == 1:  # asked per request and step
            return self.seqs[0].num_generated
        return sum(s.num_generated for s in self.seqs)
