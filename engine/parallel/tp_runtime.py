"""TensorParallelRuntime: one model split over N ranks of one host, behind ModelRuntime.

Rank 0 lives in the engine's process: a TorchRuntime over rank 0's shard, run by the
step-loop thread like any runtime, so the scheduler, the sampler and the gRPC service
see one runtime and never learn about the others. Ranks 1..N-1 are worker processes
(worker.py) started here; rank 0 sends each of them every call of the step plan
(protocol.py) before running its own part, and the ranks then meet in the two
all-reduces of every layer.

Workers are started with the "spawn" method, so like any spawning program a script that
calls from_pretrained(..., tensor_parallel_size=N) must do so under
`if __name__ == "__main__":`. `python -m service` needs nothing: spawn never re-runs a
package's __main__ module.

Failures. Ranks must make the same calls in the same order, so any failure of a step
desynchronises them for good: it raises EngineDeadError naming the rank, which stops
the engine (and its health check) rather than failing one step after another. A dead
worker is caught before each step by its exit code; one that dies mid-step fails the
step's collective (gloo: its connections close; any backend: the collective timeout).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import deque
from multiprocessing.connection import wait
from pathlib import Path

import torch
import torch.multiprocessing as mp

from engine.errors import EngineDeadError, ModelLoadError
from engine.parallel import group as tp_group
from engine.parallel.protocol import pack_batch
from engine.parallel.shard_loader import load_shard
from engine.parallel.sharding import check_tensor_parallel, local_spec
from engine.parallel.worker import WorkerArgs
from engine.parallel.worker import main as worker_main
from engine.runtime.base import ForwardBatch, ModelRuntime, ModelSpec
from engine.runtime.torch_runtime import TorchRuntime

logger = logging.getLogger(__name__)

# A rank waits at an all-reduce only for the slowest rank's share of one layer, so a
# minute without an answer means a rank is gone or stuck, never slow.
COLLECTIVE_TIMEOUT_S = 60.0
# Loading a large shard from a cold disk takes minutes; a worker that dies while loading
# is noticed at once regardless (its process sentinel).
STARTUP_TIMEOUT_S = 1800.0


class TensorParallelRuntime(ModelRuntime):
    def __init__(self, folder: str | Path, spec: ModelSpec, world_size: int, dtype: torch.dtype,
                 device: torch.device, use_fp8: bool = False, timeout_s: float = COLLECTIVE_TIMEOUT_S,
                 startup_timeout_s: float = STARTUP_TIMEOUT_S):
        check_tensor_parallel(spec, world_size)
        self.spec, self.dtype = spec, dtype
        self.world_size = world_size
        devices = tp_group.rank_devices(torch.device(device), world_size)
        self.device = devices[0]
        self.timeout_s = timeout_s
        self.dead_reason: str | None = None
        backend = tp_group.backend_for(self.device)
        if backend == "nccl":
            tp_group.set_safe_nccl_env()
            torch.cuda.set_device(self.device)
        # Kept for the runtime's life: the workers and the group rendezvous through it.
        self._store = store = tp_group.master_store(world_size, startup_timeout_s)
        self._workers = _Workers()
        # Reaps the workers when the runtime is collected or the interpreter exits.
        self._finalizer = weakref.finalize(self, self._workers.stop)
        context = mp.get_context("spawn")  # never fork a process that holds threads and CUDA
        for rank in range(1, world_size):
            args = WorkerArgs(rank, world_size, str(folder), spec, dtype, str(devices[rank]), backend,
                              store.port, timeout_s, startup_timeout_s, use_fp8)
            parent, child = context.Pipe()
            process = context.Process(target=worker_main, args=(args, child), name=f"textgen-tp-rank{rank}",
                                      daemon=True)
            process.start()
            child.close()
            self._workers.add(rank, process, parent)
        try:
            self._group = group = self._workers.watch(
                lambda: tp_group.make_group(store, backend, 0, world_size, startup_timeout_s, timeout_s),
                startup_timeout_s,
            )
            weights = load_shard(folder, spec, 0, world_size, dtype)
            self.local = TorchRuntime(local_spec(spec, world_size), weights, dtype, self.device,
                                      use_fp8=use_fp8, group=group)
            del weights
            self._workers.expect("ready", startup_timeout_s)
        except BaseException as exc:
            problem = self._workers.diagnose()
            self._finalizer()
            if problem is not None and not isinstance(exc, ModelLoadError):
                raise EngineDeadError(f"tensor parallelism failed to start: {problem}") from exc
            raise
        self.fp8_enabled = self.local.fp8_enabled
        logger.info("tensor parallel: %d ranks over %s, %d/%d q/KV heads per rank", world_size, backend,
                    self.local.spec.num_attention_heads, self.local.spec.num_key_value_heads)

    # ---- ModelRuntime -----------------------------------------------------------------
    def kv_cache_bytes_per_block(self, block_size: int) -> int:
        # Per rank: every rank holds the same blocks of its own KV heads, and the memory
        # budget (a share of one GPU's free memory) is per device too.
        return self.local.kv_cache_bytes_per_block(block_size)

    def num_kv_blocks(self, config, max_model_len: int | None = None) -> int:
        # Rank 0's answer holds for all: the ranks' shards and KV heads are the same size.
        return self.local.num_kv_blocks(config, max_model_len)

    def init_kv_cache(self, num_blocks: int, block_size: int) -> None:
        self._call(("init_kv_cache", num_blocks, block_size), lambda: self.local.init_kv_cache(num_blocks, block_size))
        self._guard(lambda: self._workers.expect("ok", self.timeout_s))

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        if pairs:
            self._call(("copy_blocks", list(pairs)), lambda: self.local.copy_blocks(pairs))

    def execute(self, batch: ForwardBatch) -> torch.Tensor:
        return self._call(("execute", pack_batch(batch)), lambda: self.local.execute(batch))

    # ---- lifecycle --------------------------------------------------------------------
    @property
    def worker_pids(self) -> dict[int, int]:
        """rank -> process id of each worker (ranks 1..N-1), for operators and tests."""
        return {rank: p.pid for rank, p in zip(self._workers.ranks, self._workers.processes)}

    def close(self) -> None:
        """Stop the workers (also done when the runtime is collected or at exit)."""
        healthy = self.dead_reason is None
        self.dead_reason = self.dead_reason or "the runtime was closed"
        self._finalizer()
        if healthy:
            # NCCL warns at exit about communicators never shut down. After a failure a
            # collective may still hang in one, so a dead group is left to process exit.
            self._group.shutdown()

    def _call(self, message: tuple, local):
        """Send `message` to every worker, then run rank 0's part of the same call."""
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)

        def on_all_ranks():
            self._workers.send(message)
            return local()

        return self._guard(on_all_ranks)

    def _guard(self, work):
        """Run work() unless a worker is already dead; turn any failure into EngineDeadError."""
        try:
            problem = self._workers.diagnose()
            if problem is None:
                return work()
        except Exception as exc:  # whatever broke, the ranks are out of step now
            # A dying worker closes its connections a moment before it exits: wait a
            # little, so the message names it rather than only the collective's error.
            problem = self._workers.diagnose(grace_s=2.0) or f"step failed with every worker still running: {exc!r}"
        self.dead_reason = f"tensor-parallel {problem}"
        logger.error("%s; stopping the other ranks", self.dead_reason)
        # Survivors wait in a collective for a rank that will never come: no graceful stop.
        self._workers.stop(grace_s=0.0)
        raise EngineDeadError(self.dead_reason)


class _Workers:
    """The worker processes and their pipes, rank by rank. Holds no reference to the
    runtime, so weakref.finalize can stop them when the runtime goes."""

    def __init__(self):
        self.ranks: list[int] = []
        self.processes: list = []
        self.pipes: list = []
        self.inbox: dict[int, deque] = {}  # answers read while looking for errors
        self.errors: dict[int, str] = {}

    def add(self, rank: int, process, pipe) -> None:
        self.ranks.append(rank)
        self.processes.append(process)
        self.pipes.append(pipe)
        self.inbox[rank] = deque()

    def send(self, message: tuple) -> None:
        for rank, pipe in zip(self.ranks, self.pipes):
            try:
                pipe.send(message)
            except OSError as exc:
                raise RuntimeError(f"rank {rank} is unreachable ({exc})") from None

    def expect(self, answer: str, timeout_s: float) -> None:
        """Wait until every worker has answered `answer`; raise if one fails or dies first."""
        deadline = time.monotonic() + timeout_s
        for rank, process, pipe in zip(self.ranks, self.processes, self.pipes):
            while not self._pull(rank, pipe):
                problem = self.diagnose()
                if problem is not None:
                    raise RuntimeError(problem)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"rank {rank} did not answer {answer!r} within {timeout_s:.0f} s")
                wait([pipe, process.sentinel], left)
            message = self.inbox[rank].popleft()
            if message[0] != answer:
                raise RuntimeError(f"rank {rank} answered {message!r}, expected {answer!r}")

    def watch(self, work, timeout_s: float):
        """work() on a helper thread, given up as soon as a worker fails: rank 0's half of a
        rendezvous would otherwise wait out its whole timeout for a worker that died."""
        result: dict = {}

        def run():
            try:
                result["value"] = work()
            except BaseException as exc:  # handed to the caller below
                result["error"] = exc

        thread = threading.Thread(target=run, name="textgen-tp-rendezvous", daemon=True)
        thread.start()
        deadline = time.monotonic() + timeout_s
        while thread.is_alive():
            problem = self.diagnose()
            if problem is not None:
                raise RuntimeError(problem)
            if time.monotonic() > deadline:
                raise TimeoutError(f"tensor-parallel rendezvous took over {timeout_s:.0f} s")
            wait([p.sentinel for p in self.processes], 0.1)
        if "error" in result:
            raise result["error"]
        return result["value"]

    def _pull(self, rank: int, pipe) -> bool:
        """Read what the worker has sent (errors aside, into its inbox); True if its inbox holds a message."""
        try:
            while pipe.poll():
                message = pipe.recv()
                if message[0] == "error":
                    self.errors[rank] = message[1]
                else:
                    self.inbox[rank].append(message)
        except (EOFError, OSError):  # the worker is gone; diagnose() says so
            pass
        return bool(self.inbox[rank])

    def diagnose(self, grace_s: float = 0.0) -> str | None:
        """The first failed worker, in words (its rank, exit code and last error), or None."""
        deadline = time.monotonic() + grace_s
        while True:
            for rank, process, pipe in zip(self.ranks, self.processes, self.pipes):
                self._pull(rank, pipe)
                if rank in self.errors or not process.is_alive():
                    return self._describe(rank, process)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def _describe(self, rank: int, process) -> str:
        process.join(0.5)
        code = process.exitcode
        state = "is alive but failed" if code is None else f"died (exit code {code})"
        error = self.errors.get(rank)
        last = f": {error.strip().splitlines()[-1]}" if error else ""
        return f"rank {rank} worker process {state}{last}"

    def stop(self, grace_s: float = 5.0) -> None:
        """Ask each worker to stop, wait grace_s, then terminate it. Safe to repeat."""
        for pipe in self.pipes:
            try:
                pipe.send(("stop",))
            except OSError:  # closed, or the worker is gone
                pass
        for process in self.processes:
            process.join(grace_s)
            if process.is_alive():
                process.terminate()
                process.join(2.0)
            if process.is_alive():  # a stopped or wedged process ignores SIGTERM
                process.kill()
                process.join(2.0)
        for pipe in self.pipes:
            pipe.close()
