"""The step loop: a background thread that owns the LLMEngine.

Callers on any thread submit and abort through a command queue; the loop applies
commands between steps, so engine state is only ever touched by this thread.
Outputs go back through each request's sink, called on this thread.

Requests are validated against `EngineLimits` by `validate_request`, which the
engine-process loop (engine/engine_process.py) also runs, in the parent, on the
limits its child reports.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from engine.errors import ContextLengthError, EngineDeadError, InvalidParameterError, QueueFullError
from engine.llm_engine import LLMEngine
from engine.model_info import EngineStats
from engine.outputs import FinishReason, RequestOutput, SequenceOutput
from engine.params import GenerationRequest
from engine.sequence import Request

logger = logging.getLogger(__name__)

Sink = Callable[[RequestOutput], None]
# Why requests are refused while the watchdog holds a step for stuck.
STALLED = "its step loop is stalled (a step has not returned)"


@dataclass(frozen=True)
class EngineLimits:
    """What a request is checked against before it is queued."""

    vocab_size: int
    max_model_len: int
    max_num_seqs: int
    num_kv_blocks: int
    block_size: int

    @classmethod
    def of(cls, engine: LLMEngine) -> "EngineLimits":
        pool = engine.block_manager
        return cls(engine.runtime.spec.vocab_size, engine.max_model_len, engine.config.max_num_seqs,
                   pool.num_blocks, pool.block_size)


def validate_request(request: GenerationRequest, limits: EngineLimits, field: str) -> None:
    """Raise InvalidParameterError / ContextLengthError (naming `field` for the prompt) for a
    request the engine could never serve."""
    ids = request.prompt_token_ids
    vocab = limits.vocab_size
    if len(ids) == 0:
        raise InvalidParameterError(field, "the prompt is empty")
    bad = next((t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab), None)
    if bad is not None:
        raise InvalidParameterError(field, f"token id {bad!r} is outside the vocabulary [0, {vocab})")
    if len(ids) >= limits.max_model_len:
        raise ContextLengthError(field, f"the prompt has {len(ids)} tokens; the context holds {limits.max_model_len}")
    params = request.params
    # A request's sequences (beams, samples) all run in the same step: more than a
    # step holds could never be scheduled, and would wait forever.
    if params.num_sequences > limits.max_num_seqs:
        name = "num_beams" if params.use_beam_search else "num_return_sequences"
        raise InvalidParameterError(
            name, f"{params.num_sequences} sequences; this server runs at most {limits.max_num_seqs} per step "
                  "(max_num_seqs)"
        )
    # The most KV blocks the request can hold at once: its sequences share the prompt's
    # full blocks, and each owns a copy of the prompt's partial last block plus its new tokens.
    shared = len(ids) // limits.block_size
    own = -(-(len(ids) % limits.block_size + params.max_new_tokens) // limits.block_size)  # blocks, rounded up
    needed = shared + params.num_sequences * own
    if needed > limits.num_kv_blocks:
        raise ContextLengthError(
            "max_new_tokens",
            f"prompt plus max_new_tokens needs {needed} KV blocks for {params.num_sequences} "
            f"sequence{'s' if params.num_sequences > 1 else ''}; the pool has {limits.num_kv_blocks}",
        )


def admit(request: GenerationRequest, in_flight, max_in_flight: int, dead_reason: str | None, stopping: bool,
          ids) -> str:
    """The request's id (its own, or the next of `ids`) if the loop takes it now; raises
    EngineDeadError, QueueFullError or InvalidParameterError (an id already in flight)
    otherwise. The caller holds the lock that guards `in_flight` (its request ids)."""
    if dead_reason is not None:
        raise EngineDeadError(f"the engine has stopped: {dead_reason}")
    if stopping:
        raise EngineDeadError("the engine is shutting down")
    if len(in_flight) >= max_in_flight:
        raise QueueFullError(f"{len(in_flight)} requests in flight; the limit is {max_in_flight}")
    request_id = request.request_id or f"req-{next(ids)}"
    if request_id in in_flight:
        raise InvalidParameterError("request_id", f"{request_id!r} is already in flight")
    return request_id


def last_output(request_id: str, prompt_tokens: int, reason: FinishReason, error: str | None = None,
                engine_stopped: bool = False) -> RequestOutput:
    """The final output of a request that the engine drops without a step: it stopped or
    stalled (ERROR, with `error` and engine_stopped), its step failed (ERROR) or it shut
    down (ABORTED)."""
    return RequestOutput(
        request_id=request_id,
        sequences=(SequenceOutput(index=0, token_ids=(), text="", finish_reason=reason),),
        finished=True,
        prompt_tokens=prompt_tokens,
        completion_tokens=0,
        cached_tokens=0,
        error=error,
        engine_stopped=engine_stopped,
    )


def end_requests(requests: dict[str, tuple[Sink, int]], reason: FinishReason, error: str | None = None,
                 engine_stopped: bool = False) -> None:
    """Give each request (id -> (sink, prompt length)) its last_output; a broken sink
    does not stop the others."""
    for request_id, (sink, prompt_len) in requests.items():
        try:
            sink(last_output(request_id, prompt_len, reason, error, engine_stopped))
        except Exception:  # noqa: BLE001 - a broken sink must not stop the others
            logger.exception("sink failed for %s", request_id)


def watchdog_period(timeout_s: float) -> float:
    """How often a watchdog looks: often enough to answer within a quarter of its timeout."""
    return min(1.0, max(0.02, timeout_s / 4))


class EngineLoop:
    def __init__(self, engine: LLMEngine, max_in_flight: int, watchdog_timeout_s: float,
                 after_pass: Callable[[], None] | None = None, fail_stalled: bool = True):
        """after_pass: called on the loop thread after each pass that may have delivered
        outputs (a step, commands before idling, the stop, the death), so that an engine
        process can ship each step's outputs to its parent in one message.

        fail_stalled: when a step has not returned for watchdog_timeout_s, a watchdog
        thread ends every request in flight with an error (engine_stopped: the caller may
        retry elsewhere) instead of leaving them to wait for their deadlines; if the step
        returns after all, the loop aborts them in the engine and serves again. An engine
        process's loop leaves this to its parent, which sees the same silence."""
        self.engine = engine
        self.limits = EngineLimits.of(engine)
        self.max_in_flight = max_in_flight
        self.watchdog_timeout_s = watchdog_timeout_s
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._commands: deque = deque()
        # request id -> (the caller's sink, prompt length), from submit to the last output
        self._in_flight: dict[str, tuple[Sink, int]] = {}
        # Requests the watchdog has answered that the engine may still hold: their outputs
        # are dropped, and the loop aborts them when its step returns.
        self._dropped: set[str] = set()
        self._stalled = False
        self._ids = itertools.count()
        self._stopping = False
        self.dead_reason: str | None = None
        self.last_progress = time.monotonic()
        self.busy = False
        self._after_pass = after_pass or (lambda: None)
        self._closed = threading.Event()  # the loop has ended: the watchdog ends too
        self._thread = threading.Thread(target=self._run, name="textgen-step-loop", daemon=True)
        self._thread.start()
        if fail_stalled:
            threading.Thread(target=self._watch, name="textgen-watchdog", daemon=True).start()

    # ---- any thread -------------------------------------------------------------------
    def submit(self, request: GenerationRequest, sink: Sink, field: str = "token_ids") -> str:
        """Queue a request; returns its id.

        Raises InvalidParameterError / ContextLengthError (naming `field` for the prompt),
        QueueFullError, or EngineDeadError.
        """
        validate_request(request, self.limits, field)
        with self._lock:
            stopped = self.dead_reason or (STALLED if self._stalled else None)
            request_id = admit(request, self._in_flight, self.max_in_flight, stopped, self._stopping, self._ids)
            self._in_flight[request_id] = (sink, len(request.prompt_token_ids))

            def deliver(output: RequestOutput) -> None:
                if self._dropped and output.request_id in self._dropped:
                    return  # the watchdog has already given this request its last output
                if output.finished:
                    with self._lock:
                        self._in_flight.pop(output.request_id, None)
                sink(output)

            state = Request(request_id, list(request.prompt_token_ids), request.params, deliver)
            self._commands.append(("add", state))
        self._wakeup.set()
        return request_id

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._commands.append(("abort", request_id))
        self._wakeup.set()

    @property
    def num_in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def is_healthy(self) -> bool:
        if self.dead_reason is not None or self._stalled:
            return False
        return not self._step_overdue()

    def _step_overdue(self) -> bool:
        """A step has been running for longer than watchdog_timeout_s."""
        return self.busy and time.monotonic() - self.last_progress > self.watchdog_timeout_s

    def stats(self) -> EngineStats:
        engine = self.engine
        blocks = engine.block_manager
        running = len(engine.scheduler.running)
        return EngineStats(
            running=running,
            waiting=max(0, self.num_in_flight - running),
            kv_blocks_total=blocks.num_blocks,
            kv_blocks_used=blocks.num_used_blocks,
            kv_blocks_free=blocks.num_free_blocks,
            preemptions_total=engine.scheduler.preemptions_total,
            prefix_cache_queries_total=engine.scheduler.prefix_queries,
            prefix_cache_hits_total=engine.scheduler.prefix_hits,
            steps_total=engine.steps_total,
            healthy=self.is_healthy,
        )

    def shutdown(self, timeout: float = 30.0) -> None:
        with self._lock:
            self._stopping = True
        self._wakeup.set()
        self._thread.join(timeout)

    # ---- the watchdog thread ------------------------------------------------------------
    def _watch(self) -> None:
        while not self._closed.wait(watchdog_period(self.watchdog_timeout_s)):
            if not self._stalled and self._step_overdue():
                self._fail_in_flight()

    def _fail_in_flight(self) -> None:
        """A step has not returned for watchdog_timeout_s: answer every request in flight
        with an error now. The engine's state belongs to the stuck loop thread and is
        left alone; the loop aborts these requests when (if) the step returns."""
        with self._lock:
            self._stalled = True
            failed, self._in_flight = self._in_flight, {}
            self._dropped.update(failed)
        message = f"the engine stalled: no step has finished for {self.watchdog_timeout_s:g} s"
        logger.error("%s; ending the %d requests in flight", message, len(failed))
        end_requests(failed, FinishReason.ERROR, message, engine_stopped=True)

    # ---- the loop thread --------------------------------------------------------------
    def _apply_commands(self) -> None:
        with self._lock:
            commands, self._commands = self._commands, deque()
        for kind, payload in commands:
            if kind == "add":
                self.engine.add_request(payload)
            else:
                # Commands apply in order, so an abort right after its add finds the request;
                # one that raced a finish finds nothing and does nothing.
                self.engine.abort(payload)

    def _run(self) -> None:
        try:
            while True:
                self._apply_commands()
                if self._stopping:
                    self.engine.abort_all()
                    self._after_pass()
                    return
                if not self.engine.has_work:
                    self.busy = False
                    self._after_pass()  # aborts deliver at once, without a step
                    self._wakeup.wait(0.5)
                    self._wakeup.clear()
                    continue
                if not self.busy:
                    # Work after idling: the watchdog's clock starts now, not at the last step.
                    self.last_progress = time.monotonic()
                    self.busy = True
                self.engine.step()
                self.last_progress = time.monotonic()
                if self._stalled:
                    self._recover()
                self._after_pass()
        except Exception as exc:  # a bug in engine state: nothing can be trusted any more
            logger.exception("the step loop died")
            self._die(repr(exc))
            self._after_pass()
        finally:
            self._closed.set()

    def _recover(self) -> None:
        """The stalled step returned: abort what the watchdog answered (freeing its KV
        blocks; its outputs are dropped) and serve again."""
        with self._lock:
            dropped = set(self._dropped)
            # Requests answered before the loop took them in are never added.
            self._commands = deque(c for c in self._commands if not (c[0] == "add" and c[1].request_id in dropped))
        for request_id in dropped:
            self.engine.abort(request_id)
        with self._lock:
            self._dropped -= dropped
            self._stalled = False
        logger.warning("the step loop is making progress again; the %d requests it stalled were aborted", len(dropped))

    def _die(self, reason: str) -> None:
        with self._lock:
            self.dead_reason = reason
            pending = [p for k, p in self._commands if k == "add"]
            self._commands.clear()
        requests = {r.request_id: (r.sink, r.prompt_len) for r in [*self.engine.requests.values(), *pending]}
        end_requests(requests, FinishReason.ERROR, f"the engine stopped: {reason}", engine_stopped=True)
