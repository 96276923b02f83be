"""Copy-on-write of KV blocks, shared by the runtimes whose pool is [layers, blocks, ...]."""

from __future__ import annotations

import torch

from engine.transfer import to_device


def copy_kv_blocks(kv_cache: torch.Tensor | None, pairs: list[tuple[int, int]]) -> None:
    """Copy block src into block dst in every layer, for each (src, dst)."""
    if not pairs or kv_cache is None:
        return
    index = to_device([p for pair in zip(*pairs) for p in pair], torch.int64, kv_cache.device)
    src, dst = index.split(len(pairs))
    if kv_cache.dtype.itemsize == 1:  # FP8: copied as bytes, whatever FP8 indexing a torch build supports
        kv_cache = kv_cache.view(torch.uint8)
    with torch.inference_mode():
        # Gather first (a copy), so a block that is both a source and a destination
        # is read before it is overwritten.
        kv_cache[:, dst] = kv_cache[:, src]
