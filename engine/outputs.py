"""Per-step outputs that leave the engine.

They are values: the engine never changes one after handing it out, and consumers must
not either. They are plain slotted dataclasses rather than frozen ones because the step
loop builds one or two per request per step, and a frozen dataclass costs three times
as much to build (2.6 against 0.85 us by timeit): at 256 rows, about 0.9 ms a step.

They also cross a process boundary (engine/engine_process.py pickles every step's
outputs), so each pickles as its constructor call over its field values."""

from __future__ import annotations

import dataclasses
import enum
import operator
from dataclasses import dataclass


class FinishReason(str, enum.Enum):
    LENGTH = "length"  # max_new_tokens or the context end
    EOS = "eos"  # an eos_token_id
    STOP_TOKEN = "stop_token"  # one of stop_token_ids
    STOP_STRING = "stop_string"  # one of stop_strings
    ABORTED = "aborted"  # abort(), a cancelled client or a passed deadline
    ERROR = "error"  # the model step failed for this request


def _pickled_by_fields(cls):
    """Pickle as cls(*field values). By default a slotted dataclass pickles its state as a
    dict of slot names, set back one by one: a step's 64 one-token outputs took 271 us to
    dump and 160 us to load (6.0 kB), against 144 and 63 us (3.3 kB) like this
    (bench/cpu_probes.py, docs/benchmarks.md)."""
    values = operator.attrgetter(*(f.name for f in dataclasses.fields(cls)))

    def __reduce__(self):
        return cls, values(self)

    cls.__reduce__ = __reduce__
    return cls


@_pickled_by_fields
@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    # (token_id, logprob) of the top alternatives, best first.
    top: tuple[tuple[int, float], ...] = ()


@_pickled_by_fields
@dataclass(slots=True)
class SequenceOutput:
    """What one sequence of a request produced in one step (a delta)."""

    index: int
    token_ids: tuple[int, ...]
    text: str
    finish_reason: FinishReason | None = None
    cumulative_logprob: float = 0.0
    logprobs: tuple[TokenLogprob, ...] | None = None


@_pickled_by_fields
@dataclass(slots=True)
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
    # With error: the engine stopped or stalled (not this request's fault); the same
    # request may succeed elsewhere or later. Raised as EngineDeadError, not RequestFailedError.
    engine_stopped: bool = False


def merge_outputs(earlier: RequestOutput, later: RequestOutput) -> RequestOutput:
    """Two successive outputs of one request as one: each sequence's deltas joined in order,
    the request's totals and finish state from the later one. A consumer that falls behind
    (a slow stream) then gets one message for several steps instead of a growing backlog."""
    merged: dict[int, SequenceOutput] = {s.index: s for s in earlier.sequences}
    for s in later.sequences:
        before = merged.get(s.index)
        if before is None:
            merged[s.index] = s
            continue
        logprobs = None
        if before.logprobs is not None or s.logprobs is not None:
            logprobs = (before.logprobs or ()) + (s.logprobs or ())
        merged[s.index] = SequenceOutput(
            index=s.index,
            token_ids=before.token_ids + s.token_ids,
            text=before.text + s.text,
            finish_reason=s.finish_reason,
            cumulative_logprob=s.cumulative_logprob,
            logprobs=logprobs,
        )
    return RequestOutput(
        request_id=later.request_id,
        sequences=tuple(merged.values()),
        finished=later.finished,
        prompt_tokens=later.prompt_tokens,
        completion_tokens=later.completion_tokens,
        cached_tokens=later.cached_tokens,
        error=later.error,
        queue_time_s=later.queue_time_s if later.queue_time_s is not None else earlier.queue_time_s,
        engine_stopped=later.engine_stopped,
    )
