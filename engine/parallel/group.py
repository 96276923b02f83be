"""The tensor-parallel process group: gloo on CPU, NCCL on CUDA, over a TCPStore on rank 0.

Each engine makes its own group object (a c10d backend built directly on its own store)
instead of torch.distributed's process-wide default group: that one can exist once per
process, and a process (a test run, an application) may hold several engines.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

# NVLink multicast (NVLS) stays off: on shared hosts a program using it can put every
# GPU of the host out of service. Set before the workers start so they inherit it.
NCCL_SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}

HOST = "127.0.0.1"  # tensor parallelism spans one host


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def rank_devices(device: torch.device, world_size: int) -> list[torch.device]:
    """One device per rank: cuda:i, cuda:i+1, ... from the given one; all "cpu" on CPU."""
    if device.type != "cuda":
        return [device] * world_size
    first = device.index or 0
    visible = torch.cuda.device_count()
    if first + world_size > visible:
        raise ValueError(
            f"tensor_parallel_size={world_size} needs GPUs cuda:{first}..cuda:{first + world_size - 1}; "
            f"{visible} visible"
        )
    return [torch.device("cuda", first + r) for r in range(world_size)]


def master_store(world_size: int, timeout_s: float) -> dist.TCPStore:
    """Rank 0's rendezvous store, on a free port (store.port) the workers are told."""
    return dist.TCPStore(HOST, 0, world_size, is_master=True, timeout=timedelta(seconds=timeout_s),
                         wait_for_workers=False)


def worker_store(port: int, world_size: int, timeout_s: float) -> dist.TCPStore:
    return dist.TCPStore(HOST, port, world_size, is_master=False, timeout=timedelta(seconds=timeout_s))


def make_group(store: dist.Store, backend: str, rank: int, world_size: int, connect_timeout_s: float,
               timeout_s: float):
    """A c10d backend with allreduce([tensor]); collectives fail after timeout_s, not hang.

    Collective: every rank must call it (it connects the ranks to each other), and ranks
    arrive seconds apart (a worker first imports torch), hence the longer connect timeout.
    """
    prefixed = dist.PrefixStore(f"textgen-tp/{backend}/", store)
    if backend == "gloo":
        group = dist.ProcessGroupGloo(prefixed, rank, world_size, timedelta(seconds=connect_timeout_s))
    else:
        options = dist.ProcessGroupNCCL.Options()
        options.is_high_priority_stream = False
        options._timeout = timedelta(seconds=timeout_s)
        options.global_ranks_in_group = list(range(world_size))
        options.group_name = "textgen-tp"
        group = dist.ProcessGroupNCCL(prefixed, rank, world_size, options)
    group.set_timeout(timedelta(seconds=timeout_s))
    return group


def set_safe_nccl_env() -> None:
    os.environ.update(NCCL_SAFE_ENV)
