"""AsyncEngine: the asyncio face of the engine, used by the gRPC service.

Many concurrent `generate` calls share the step loop's batches; nothing here
blocks the event loop. The loop thread hands outputs back through a mailbox per event
loop: one wake-up (call_soon_threadsafe, a write to the loop's self-pipe) per batch of
outputs rather than per output, which at 64 streams was 64 wake-ups a step.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections import deque
from typing import AsyncIterator

from engine.errors import output_error
from engine.factory import LoadedModel, load_model
from engine.model_info import EngineStats, ModelInfo
from engine.outputs import RequestOutput, merge_outputs
from engine.params import GenerationRequest, SamplingParams

__all__ = ["AsyncEngine", "EngineStats", "ModelInfo"]


class AsyncEngine:
    """One model, one background step loop, many concurrent requests."""

    def __init__(self, loaded: LoadedModel):
        self._loaded = loaded
        self._loop = loaded.loop
        self.tokenizer = loaded.tokenizer
        self.info: ModelInfo = loaded.info
        # One mailbox per event loop that calls generate(): outputs cross threads in batches.
        self._mailboxes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._mailboxes_lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, model=None, *, use_fp8: bool = False, dtype=None, device=None, **engine_options) -> "AsyncEngine":
        """Load like engine.AutoModelForCausalLM.from_pretrained and start the step loop."""
        return cls(load_model(model, use_fp8=use_fp8, dtype=dtype, device=device, **engine_options))

    def resolve_params(self, prompt_len: int, **overrides) -> SamplingParams:
        """Model defaults plus overrides (transformers' names). Raises InvalidParameterError."""
        return self._loaded.resolve_params(prompt_len, **overrides)

    async def generate(self, request: GenerationRequest, *, prompt_field: str = "token_ids") -> AsyncIterator[RequestOutput]:
        """Per-step outputs of one request (a single one at the end when its params ask for
        final_output_only); the last has finished=True.

        Raises InvalidParameterError / ContextLengthError for a bad request, QueueFullError
        when full, EngineDeadError when the loop has died or stalls under the request,
        RequestFailedError when the request's model step failed. Closing the iterator early
        aborts the request.
        """
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        mailbox = self._mailbox(asyncio.get_running_loop())

        def sink(output: RequestOutput) -> None:
            mailbox.post(queue, output)

        request_id = self._loop.submit(request, sink, field=prompt_field)
        finished = False
        try:
            while True:
                output = await queue.get()
                # Outputs that piled up while the consumer was busy (a slow stream) go out
                # as one: fewer, larger messages instead of a growing backlog.
                while not queue.empty() and not output.finished and output.error is None:
                    output = merge_outputs(output, queue.get_nowait())
                if output.error is not None:
                    finished = output.finished
                    raise output_error(output.error, output.engine_stopped)
                finished = output.finished
                yield output
                if finished:
                    return
        finally:
            if not finished:
                self._loop.abort(request_id)

    def _mailbox(self, event_loop: asyncio.AbstractEventLoop) -> "_Mailbox":
        with self._mailboxes_lock:
            mailbox = self._mailboxes.get(event_loop)
            if mailbox is None:
                mailbox = self._mailboxes[event_loop] = _Mailbox(event_loop)
            return mailbox

    def abort(self, request_id: str) -> None:
        """Abort a request from any thread; idempotent; its blocks are freed at the next step."""
        self._loop.abort(request_id)

    def stats(self) -> EngineStats:
        return self._loop.stats()

    @property
    def is_healthy(self) -> bool:
        return self._loop.is_healthy

    async def shutdown(self) -> None:
        """Stop the step loop; pending requests finish with FinishReason.ABORTED."""
        await asyncio.to_thread(self._loop.shutdown)


class _Mailbox:
    """Outputs posted from the step loop's thread, delivered on one asyncio event loop."""

    def __init__(self, event_loop: asyncio.AbstractEventLoop):
        self._event_loop = event_loop
        self._lock = threading.Lock()
        self._items: deque = deque()
        self._scheduled = False

    def post(self, queue: asyncio.Queue, output: RequestOutput) -> None:
        with self._lock:
            self._items.append((queue, output))
            if self._scheduled:
                return  # a delivery is already on its way; it takes this one too
            self._scheduled = True
        try:
            self._event_loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the event loop is closed; nobody is listening
            with self._lock:
                self._items.clear()
                self._scheduled = False

    def _deliver(self) -> None:
        with self._lock:
            items, self._items = self._items, deque()
            self._scheduled = False
        for queue, output in items:
            queue.put_nowait(output)
