"""Host-to-device copies that never wait for the device.

`torch.tensor(values, device="cuda")` copies from pageable memory, which synchronises
the stream: the host stalls until every kernel queued before it has run. With the
step loop launching step N+1 while step N still runs (engine/llm_engine.py), one such
copy would serialise the two again. These helpers stage the values in pinned memory
and copy without blocking; the caching host allocator keeps the staging buffer alive
until the copy has run.
"""

from __future__ import annotations

import torch


def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of `values` (a list, or a CPU tensor) on `device`, without a host wait."""
    host = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device=device, dtype=dtype)
    return host.to(dtype).pin_memory().to(device, non_blocking=True)
