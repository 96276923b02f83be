"""The step loop in a process of its own (EngineConfig.engine_process).

In one process the gRPC server's event loop and the step-loop thread share the GIL: at
64 streams the server's per-message work and the step's host work (scheduling, sampling
bookkeeping, stop checks) wait for each other, and streamed throughput fell to 0.82-0.94
of the engine's own (bench/serve_bench.py). Here the step loop runs in a child process,
started with "spawn" (CUDA cannot be forked), so each side has a GIL of its own.

Child: a picklable builder makes the LLMEngine (weights load, and CUDA starts, only
there) and an ordinary EngineLoop runs it. The requests' sinks collect outputs, and after
each pass of the loop (one step) one message goes to the parent: the step's outputs and
a stats snapshot. The child stops when told to, or when its pipe closes (the parent died).
Like any spawning program, a script that starts one must do so under
`if __name__ == "__main__":` (spawn re-imports the script in the child).

Parent: `ProcessEngineLoop`, the face AsyncEngine sees (EngineLoop's interface).
It validates and admits requests itself, against the limits the child reported at
start, and a reader thread hands each batch of outputs to the requests' sinks.

Messages: parent -> child ("add", request_id, prompt token ids, params), ("abort",
request_id), ("stop",); child -> parent ("ready", StartReport) or ("failed", exception,
traceback) once, then (outputs, stats or None, dead_reason or None) per step.

Logs: the child's records (at the parent's level or above) go up a queue of their own and
a thread of the parent hands each to the logger of its name, so they reach the parent's
handlers (a server's log file or collector) marked "[engine process]", rather than only
the child's stderr.
"""

from __future__ import annotations

import atexit
import dataclasses
import itertools
import logging
import logging.handlers
import multiprocessing
import signal
import threading
import time
import traceback
import weakref
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Callable

from engine.config import EngineConfig
from engine.engine_loop import (
    STALLED,
    EngineLimits,
    EngineLoop,
    Sink,
    admit,
    end_requests,
    last_output,
    validate_request,
    watchdog_period,
)
from engine.errors import EngineDeadError
from engine.llm_engine import LLMEngine, freeze_startup_objects
from engine.model_info import EngineStats
from engine.outputs import FinishReason, RequestOutput
from engine.params import GenerationRequest

logger = logging.getLogger(__name__)

# How long a child that was told to stop (or lost its parent) gets to abort its requests
# and exit before it is killed.
STOP_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class StartReport:
    """What the child tells the parent once its engine is built."""

    limits: EngineLimits
    config: EngineConfig  # the engine's own
    runtime: str  # the runtime's class name
    device: str
    dtype: str  # "float32", "bfloat16"
    fp8: bool  # FP8 weights really in use
    kv_pool: str | None  # the runtime's report of its KV pool, where it makes one


class ProcessEngineLoop:
    """EngineLoop's interface over a step loop in a child process."""

    def __init__(self, builder: Callable[[], LLMEngine]):
        """builder: a picklable callable (a module-level function, or functools.partial of
        one) that returns the LLMEngine; it runs in the child. Blocks until the engine is
        built; raises what the builder raised when the child could not build it."""
        context = multiprocessing.get_context("spawn")
        self._conn, child_end = context.Pipe()
        level = logging.getLogger().getEffectiveLevel()
        self._logs = context.Queue()
        threading.Thread(target=_relay_logs, args=(self._logs,), name="textgen-engine-logs", daemon=True).start()
        # daemon: multiprocessing's exit handler ends it if everything else failed.
        self._process = context.Process(target=_child_main, args=(builder, child_end, level, self._logs),
                                        name="textgen-engine", daemon=True)
        try:
            self._process.start()  # pickles the builder
        finally:
            child_end.close()  # the child's copy alone holds it open: its death reads as EOF here
        # Reaps the child when this object is collected or the interpreter exits without shutdown().
        self._reaped = threading.Event()  # set first: the child's exit that follows is no failure
        self._finalizer = weakref.finalize(self, _reap, self._process, self._conn, self._reaped)
        # Registered now, so it runs at exit before multiprocessing's own handler (registered
        # earlier), which would SIGTERM the child (ignored: see _child_main) and wait forever.
        atexit.register(self._finalizer)
        try:
            self.report: StartReport = self._wait_ready()
        except BaseException:
            self._finalizer()
            self._conn.close()
            self._logs.put(None)  # the child has exited: its records are in; the relay ends
            raise
        self.limits = self.report.limits
        config = self.report.config
        self.max_in_flight = config.max_in_flight
        self.watchdog_timeout_s = config.watchdog_timeout_s
        self.dead_reason: str | None = None
        self._lock = threading.Lock()  # guards _sinks, _stopping, dead_reason and sends
        self._sinks: dict[str, tuple[Sink, int]] = {}  # request id -> (sink, prompt length)
        self._ids = itertools.count()
        self._stopping = False
        self._stats = EngineStats(running=0, waiting=0, kv_blocks_total=self.limits.num_kv_blocks, kv_blocks_used=0,
                                  kv_blocks_free=self.limits.num_kv_blocks, preemptions_total=0,
                                  prefix_cache_queries_total=0, prefix_cache_hits_total=0, steps_total=0, healthy=True)
        self._last_heard = time.monotonic()
        # The watchdog has answered the requests in flight; set until the child is heard from.
        self._stalled = False
        self._closed = threading.Event()  # the child is gone: the watchdog ends too
        self._reader = threading.Thread(target=self._read, name="textgen-engine-reader", daemon=True)
        self._reader.start()
        threading.Thread(target=self._watch, name="textgen-engine-watchdog", daemon=True).start()

    @property
    def pid(self) -> int:
        return self._process.pid

    def _wait_ready(self) -> StartReport:
        # Building can take minutes (weights from disk, CUDA graphs); a child that dies
        # meanwhile is noticed at once through its sentinel.
        wait([self._conn, self._process.sentinel])
        try:
            message = self._conn.recv()
        except (EOFError, OSError):
            self._process.join(STOP_TIMEOUT_S)
            raise RuntimeError(f"the engine process {_exit_text(self._process.exitcode)} while starting") from None
        if message[0] == "failed":
            _, error, child_traceback = message
            cause = RuntimeError(f"in the engine process:\n{child_traceback}")
            raise (error or cause) from cause
        return message[1]

    # ---- any thread -------------------------------------------------------------------
    def submit(self, request: GenerationRequest, sink: Sink, field: str = "token_ids") -> str:
        """As EngineLoop.submit: queue a request, return its id; raises the same errors."""
        validate_request(request, self.limits, field)
        with self._lock:
            stopped = self.dead_reason or (STALLED if self._stalled else None)
            request_id = admit(request, self._sinks, self.max_in_flight, stopped, self._stopping, self._ids)
            if not self._sinks:
                # Work after idling: the watchdog's clock starts now, not at the last message.
                self._last_heard = time.monotonic()
            # Registered before sending: the reader may see its first output right after.
            self._sinks[request_id] = (sink, len(request.prompt_token_ids))
            try:
                self._conn.send(("add", request_id, request.prompt_token_ids, request.params))
            except OSError:  # the child is gone; the reader thread tells the others why
                del self._sinks[request_id]
                raise EngineDeadError("the engine process has stopped") from None
        return request_id

    def abort(self, request_id: str) -> None:
        with self._lock:
            if request_id not in self._sinks or self.dead_reason is not None:
                return  # finished, never admitted, or dropped with the child
            try:
                self._conn.send(("abort", request_id))
            except OSError:
                pass

    @property
    def num_in_flight(self) -> int:
        return len(self._sinks)

    @property
    def is_healthy(self) -> bool:
        if self.dead_reason is not None or self._stalled:
            return False
        return not self._silent_too_long()

    def _silent_too_long(self) -> bool:
        """The child sends a message every step while it has work, so silence with requests
        in flight means a step that does not return (EngineLoop's watchdog, from outside)."""
        return bool(self._sinks) and time.monotonic() - self._last_heard > self.watchdog_timeout_s

    def stats(self) -> EngineStats:
        """The child's figures as of its last step; waiting and health as the parent sees them."""
        stats = self._stats
        return dataclasses.replace(stats, waiting=max(0, self.num_in_flight - stats.running), healthy=self.is_healthy)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Abort pending requests (FinishReason.ABORTED), stop the child and reap it."""
        with self._lock:
            self._stopping = True
            try:
                self._conn.send(("stop",))
            except OSError:
                pass
        self._reader.join(timeout)  # it ends when the child has exited and closed its end
        if self._process.is_alive():
            logger.warning("the engine process did not stop within %.0f s; killing it", timeout)
            self._process.kill()
        self._finalizer()
        atexit.unregister(self._finalizer)
        self._reader.join(STOP_TIMEOUT_S)

    # ---- the watchdog thread ------------------------------------------------------------
    def _watch(self) -> None:
        while not self._closed.wait(watchdog_period(self.watchdog_timeout_s)):
            if not self._stalled and self.dead_reason is None and self._silent_too_long():
                self._fail_in_flight()

    def _fail_in_flight(self) -> None:
        """The child has been silent with requests in flight for watchdog_timeout_s (a step
        that does not return): answer them all with an error now, as EngineLoop's own
        watchdog does, and ask the child to abort them for when its step returns."""
        with self._lock:
            self._stalled = True
            failed, self._sinks = self._sinks, {}
            for request_id in failed:
                try:
                    self._conn.send(("abort", request_id))
                except OSError:
                    break
        message = f"the engine stalled: the engine process has sent nothing for {self.watchdog_timeout_s:g} s"
        logger.error("%s; ending the %d requests in flight", message, len(failed))
        end_requests(failed, FinishReason.ERROR, message, engine_stopped=True)

    # ---- the reader thread ------------------------------------------------------------
    def _read(self) -> None:
        try:
            while True:
                outputs, stats, dead_reason = self._conn.recv()
                self._last_heard = time.monotonic()
                if self._stalled:
                    self._stalled = False
                    logger.warning("the engine process is making progress again")
                self._deliver(outputs)
                if stats is not None:
                    self._stats = stats
                if dead_reason is not None and self.dead_reason is None:
                    with self._lock:
                        self.dead_reason = dead_reason
        except (EOFError, OSError):
            pass
        except Exception:  # noqa: BLE001 - a message that cannot be read: the child is of no more use
            logger.exception("could not read from the engine process")
            self._process.kill()
        self._process.join(STOP_TIMEOUT_S)
        self._conn.close()  # here, not by another thread: a recv in progress would trip over it
        self._on_child_exit()

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        sinks = self._sinks
        for output in outputs:
            entry = sinks.get(output.request_id)
            if entry is None:
                continue
            if output.finished:
                with self._lock:
                    sinks.pop(output.request_id, None)
            try:
                entry[0](output)
            except Exception:  # noqa: BLE001 - a broken sink must not stop the others
                logger.exception("sink failed for %s", output.request_id)

    def _on_child_exit(self) -> None:
        self._closed.set()
        self._logs.put(None)  # after the child's own records (it has exited): the relay ends
        with self._lock:
            if not (self._stopping or self._reaped.is_set()) and self.dead_reason is None:
                self.dead_reason = f"the engine process {_exit_text(self._process.exitcode)}"
                logger.error("%s", self.dead_reason)
            left, self._sinks = self._sinks, {}
        if self.dead_reason is not None:
            end_requests(left, FinishReason.ERROR, f"the engine stopped: {self.dead_reason}", engine_stopped=True)
        else:  # shut down before the child could abort them
            end_requests(left, FinishReason.ABORTED)


def _exit_text(code: int | None) -> str:
    if code is None:
        return "did not exit"
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def _reap(process, conn: Connection, reaped: threading.Event) -> None:
    """Tell the child to stop (if the pipe is still open) and make sure it is gone."""
    reaped.set()
    try:
        conn.send(("stop",))
    except OSError:
        pass
    process.join(STOP_TIMEOUT_S)
    if process.is_alive():
        process.kill()
        process.join()


# ---- the child process ----------------------------------------------------------------


def _relay_logs(logs) -> None:
    """The parent's side of the log queue: each child record to the logger of its name."""
    while True:
        try:
            record = logs.get()
        except (EOFError, OSError):
            return
        if record is None:
            return
        logger_ = logging.getLogger(record.name)
        if logger_.isEnabledFor(record.levelno):
            logger_.handle(record)


def _child_main(builder: Callable, conn: Connection, log_level: int, logs) -> None:
    # Ctrl-C in a terminal, and some supervisors' SIGTERM, reach the whole process group:
    # the parent drains its calls and then stops us, or we stop when its end of the pipe closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Every record to the parent (see _relay_logs), its message and any traceback already
    # formatted here, where the exception lives.
    to_parent = logging.handlers.QueueHandler(logs)
    to_parent.setFormatter(logging.Formatter("[engine process] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [to_parent]
    root.setLevel(log_level)
    try:
        engine = builder()
        runtime = engine.runtime
        report = StartReport(
            limits=EngineLimits.of(engine),
            config=engine.config,
            runtime=type(runtime).__name__,
            device=str(runtime.device),
            dtype=str(runtime.dtype).removeprefix("torch."),
            fp8=bool(getattr(runtime, "fp8_enabled", False)),
            kv_pool=getattr(runtime, "kv_pool_report", None),
        )
    except BaseException as exc:
        logger.exception("could not build the engine")
        try:
            conn.send(("failed", exc, traceback.format_exc()))
        except Exception:  # noqa: BLE001 - the exception does not pickle: its text does
            conn.send(("failed", None, traceback.format_exc()))
        raise SystemExit(1) from None
    freeze_startup_objects()  # this process serves until it exits
    conn.send(("ready", report))
    _Child(engine, conn).serve()


class _Child:
    """Runs the EngineLoop and ships its outputs: one message per pass of the loop."""

    def __init__(self, engine: LLMEngine, conn: Connection):
        self._conn = conn
        self._send_lock = threading.Lock()  # the loop thread ships; the main thread reports refusals
        self._outputs: list[RequestOutput] = []  # filled and emptied on the loop thread only
        self._sent_stats: EngineStats | None = None
        self._loop: EngineLoop | None = None
        config = engine.config
        # The parent's watchdog answers a stalled step's requests: it hears the same silence.
        self._loop = EngineLoop(engine, config.max_in_flight, config.watchdog_timeout_s,
                                after_pass=self._ship, fail_stalled=False)

    def serve(self) -> None:
        loop, collect = self._loop, self._outputs.append
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                logger.warning("the pipe to the parent closed (it exited or never shut us down); stopping")
                break
            kind = message[0]
            if kind == "add":
                _, request_id, prompt, params = message
                # Checked again (cheap next to a step): EngineLoop's own admission, unchanged.
                try:
                    loop.submit(GenerationRequest(prompt, params, request_id), collect)
                except Exception as exc:  # noqa: BLE001 - the parent checked it already; the loop died since
                    self._send(([last_output(request_id, len(prompt), FinishReason.ERROR, str(exc))], None, None))
            elif kind == "abort":
                loop.abort(message[1])
            else:
                break
        loop.shutdown(STOP_TIMEOUT_S)  # aborts what is left; its last pass ships the outputs

    def _ship(self) -> None:
        loop = self._loop
        if loop is None:  # a pass before the constructor returned: nothing can have happened
            return
        stats = loop.stats()
        if not self._outputs and stats == self._sent_stats:
            return  # an idle pass with no news
        outputs = self._outputs.copy()
        self._outputs.clear()  # the same list: the sinks append to it
        self._sent_stats = stats
        self._send((outputs, stats, loop.dead_reason))

    def _send(self, message) -> None:
        with self._send_lock:
            try:
                self._conn.send(message)
            except (BrokenPipeError, ConnectionResetError, EOFError):
                pass  # the parent is gone; serve() sees the pipe closed and stops
