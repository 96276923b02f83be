"""One Generate / GenerateStream call's life in the engine.

It names the request, converts it, submits it, and makes sure a client that goes
away (cancel, disconnect, passed deadline) aborts it: closing the engine's iterator
already does, and the RPC's done-callback calls engine.abort as a second guard.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from service import convert
from service.errors import DuplicateRequestError

logger = logging.getLogger(__name__)


class RequestRun:
    def __init__(self, engine, metrics, request, context, in_flight: dict[str, RequestRun],
                 prompt_token_ids: list[int] | None = None):
        """prompt_token_ids: the prompt already tokenized (a long one, off the event loop)."""
        if not request.request_id:  # unset or empty: "" would name no engine request to abort
            # Written back so that error logs (service/errors.py) name the request too.
            request.request_id = f"req-{uuid.uuid4().hex[:16]}"
        self.request_id = request.request_id
        # A second call under a running request's id is refused: aborting it (cancel,
        # deadline) would otherwise abort the first one too.
        if self.request_id in in_flight:
            raise DuplicateRequestError(f"request_id {self.request_id!r} is already in flight")
        self.request = convert.generation_request(request, engine, self.request_id, prompt_token_ids)
        self._engine = engine
        self._metrics = metrics
        self._timer = metrics.request_timer()
        self._finished = False
        self._cancelled = False  # the RPC was cancelled (client cancel, disconnect, deadline)
        self._failed = False  # the engine raised (bad request, full queue, failed step)
        # The server's registry of running requests, which a drain waits on.
        self._in_flight = in_flight
        in_flight[self.request_id] = self
        context.add_done_callback(self._on_rpc_done)
        p = self.request.params
        logger.info(
            "[%s] start: %d prompt tokens, max_new_tokens=%d, sequences=%d, sample=%s",
            self.request_id, len(self.request.prompt_token_ids), p.max_new_tokens, p.num_sequences, p.do_sample,
        )  # fmt: skip

    async def __aiter__(self):
        """The engine's RequestOutputs, one per step, the last with finished=True.

        The engine raises for a bad request and for a failed step (RequestFailedError).
        gRPC cancels this handler when the client cancels, disconnects or passes its deadline.
        """
        try:
            async for output in self._engine.generate(self.request):
                if output.finished:
                    self._finished = True
                    self._release()
                # Once the call is cancelled, what comes is the abort's: counted as CANCELLED, not timed.
                if not self._cancelled:
                    self._timer.observe(output)
                    if output.finished:
                        self._log_done(output)
                yield output
        except asyncio.CancelledError:
            self._count_cancelled()
            raise
        except Exception:
            self._failed = True  # map_errors logs and counts it under its status code
            raise

    def _count_cancelled(self) -> None:
        if not self._cancelled:
            self._cancelled = True
            logger.info("[%s] cancelled: the client went away or its deadline passed", self.request_id)
            self._metrics.count_error("CANCELLED")

    def _log_done(self, output) -> None:
        reasons = ",".join(s.finish_reason.value for s in output.sequences if s.finish_reason)
        logger.info(
            "[%s] done: %s, %d completion tokens (%d prompt tokens cached)",
            self.request_id, reasons, output.completion_tokens, output.cached_tokens,
        )  # fmt: skip

    def _release(self) -> None:
        # At the engine's last output already, so that a client may reuse the id at once.
        if self._in_flight.get(self.request_id) is self:
            del self._in_flight[self.request_id]

    def _on_rpc_done(self, context) -> None:
        self._release()
        # Closing the engine's iterator has already aborted an unfinished request; this is
        # the second guard. abort is idempotent, and skipped for a finished request so that
        # a client reusing its request_id at once is never hit by a late abort. A call that
        # ended with neither its last output nor an error was cancelled, even if gRPC ends
        # it before the handler sees a CancelledError.
        if not self._finished:
            if not self._failed:
                self._count_cancelled()
            self._engine.abort(self.request_id)
