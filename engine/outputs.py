"""Immutable per-step outputs that leave the engine."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class FinishReason(str, enum.Enum):
    LENGTH = "length"  # max_new_tokens or the context end
    EOS = "eos"  # an eos_token_id
    STOP_TOKEN = "stop_token"  # one of stop_token_ids
    STOP_STRING = "stop_string"  # one of stop_strings
    ABORTED = "aborted"  # abort(), a cancelled client or a passed deadline
    ERROR = "error"  # the model step failed for this request


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    # (token_id, logprob) of the top alternatives, best first.
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class SequenceOutput:
    """What one sequence of a request produced in one step (a delta)."""

    index: int
    token_ids: tuple[int, ...]
    text: str
    finish_reason: FinishReason | None = None
    cumulative_logprob: float = 0.0
    logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass(frozen=True)
class RequestOutput:
    """One step's news for one request.

    `sequences` holds only the sequences that changed in this step. Beam-search
    requests report once, when they finish, with each returned beam whole.
    """

    request_id: str
    sequences: tuple[SequenceOutput, ...]
    finished: bool
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    error: str | None = None
    # Seconds from arrival to the first schedule; None until then.
    queue_time_s: float | None = None
