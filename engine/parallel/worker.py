"""A tensor-parallel worker process (ranks 1..N-1): its own shard, its own KV cache heads.

It does what rank 0's plan says, step by step (protocol.py), and joins rank 0's
all-reduces inside each forward pass. On any failure it reports the error to rank 0 and
exits: its closed connections then fail rank 0's next collective at once, rather than
leaving rank 0 to wait for the collective timeout.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass

import torch

from engine.runtime.base import ModelSpec


@dataclass(frozen=True)
class WorkerArgs:
    rank: int
    world_size: int
    folder: str
    spec: ModelSpec  # the whole model's; the worker derives its own share
    dtype: torch.dtype
    device: str
    backend: str
    store_port: int
    timeout_s: float  # collectives
    startup_timeout_s: float  # rendezvous with rank 0
    use_fp8: bool


def main(args: WorkerArgs, conn) -> None:
    """Entry point of the spawned process."""
    try:
        _serve(args, conn)
    except EOFError:  # rank 0's process is gone: nothing left to serve
        pass
    except BaseException:  # report anything, then exit non-zero
        _report(conn, f"rank {args.rank}: {traceback.format_exc()}")
        os._exit(1)


def _serve(args: WorkerArgs, conn) -> None:
    from engine.parallel.group import make_group, worker_store
    from engine.parallel.protocol import unpack_batch
    from engine.parallel.shard_loader import load_shard
    from engine.parallel.sharding import local_spec
    from engine.runtime.torch_runtime import TorchRuntime

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        # The ranks share the host's cores; each taking all of them would oversubscribe.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.world_size))
    store = worker_store(args.store_port, args.world_size, args.startup_timeout_s)
    group = make_group(store, args.backend, args.rank, args.world_size, args.startup_timeout_s, args.timeout_s)
    weights = load_shard(args.folder, args.spec, args.rank, args.world_size, args.dtype)
    runtime = TorchRuntime(local_spec(args.spec, args.world_size), weights, args.dtype, device,
                           use_fp8=args.use_fp8, group=group)
    del weights
    conn.send(("ready",))
    while True:
        message = conn.recv()
        kind = message[0]
        if kind == "execute":
            runtime.execute(unpack_batch(message[1], device))
        elif kind == "copy_blocks":
            runtime.copy_blocks(message[1])
        elif kind == "init_kv_cache":
            runtime.init_kv_cache(message[1], message[2])
            conn.send(("ok",))
        elif kind == "stop":
            return
        else:
            raise ValueError(f"unknown message {kind!r}")


def _report(conn, text: str) -> None:
    try:
        conn.send(("error", text))
    except (OSError, ValueError):  # rank 0 is gone too
        pass
