"""Prefill attention over packed variable-length chunks, through FlashAttention.

A step's prefill chunks sit back to back in the batch (engine/runtime/base.py,
ForwardBatch). `torch.nn.attention.varlen.varlen_attn` attends all of them in one
launch, each chunk to its own keys only, from cumulative offsets. Its causal mask is
aligned to the end of the keys when a chunk has fewer queries than keys, which is what a
chunk after a cached prefix (or an earlier chunk) needs: query i of a chunk of length q
over c keys sees keys [0, c - q + i].

Keys and values: a chunk without a cached prefix attends to its own rows, so when every
chunk is fresh they are read straight from the q|k|v projection. Otherwise every chunk's
keys come from the paged cache (which rope_and_cache has just written this step's keys
into), gathered by slot into one packed tensor and, from an FP8 cache, widened to the
model dtype.

FlashAttention runs in bf16 and fp16 only, so float32 models keep the SDPA path
(engine/runtime/cuda/model.py).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch

from engine.transfer import to_device


@functools.cache
def _varlen_attn():
    """torch's varlen FlashAttention entry point, or None where this torch lacks it (or
    lacks the window_size argument that selects the causal mask)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    parameters = inspect.signature(varlen_attn).parameters
    if "window_size" not in parameters:
        return None
    # Grouped-query attention: torch 2.11 takes fewer key heads as they are; later versions
    # ask for it by name.
    return functools.partial(varlen_attn, enable_gqa=True) if "enable_gqa" in parameters else varlen_attn


def available(dtype: torch.dtype, device: torch.device) -> bool:
    return device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) and _varlen_attn() is not None


@dataclass
class PrefillInputs:
    """The prefill part of a step, for every layer: built once per forward pass."""

    start: int  # the batch row of the first prefill token
    rows: int  # prefill query tokens
    cu_q: torch.Tensor  # [chunks + 1] int32: query offsets, relative to `start`
    cu_k: torch.Tensor  # [chunks + 1] int32: key offsets in the packed keys
    max_q: int
    max_k: int
    # [total keys] int64 cache slots to gather keys and values from; None when every
    # chunk is fresh and its keys are its own rows of the projection.
    kv_slots: torch.Tensor | None


def prefill_inputs(chunks: list[tuple[int, int, int, list[int]]], block_size: int,
                   device: torch.device) -> PrefillInputs:
    """chunks: ForwardBatch.prefill_chunks, (query_start, query_len, context_len, block_table)."""
    start = chunks[0][0]
    fresh = all(ctx == qlen for _, qlen, ctx, _ in chunks)
    cu_q, cu_k, slots = [0], [0], []
    for _, qlen, ctx, blocks in chunks:
        cu_q.append(cu_q[-1] + qlen)
        cu_k.append(cu_k[-1] + ctx)
        if not fresh:
            slots.extend(blocks[p // block_size] * block_size + p % block_size for p in range(ctx))
    # One host-to-device copy for the offsets and the slots together.
    packed = to_device(cu_q + cu_k + slots, torch.int64, device)
    n = len(cu_q)
    return PrefillInputs(
        start=start,
        rows=cu_q[-1],
        cu_q=packed[:n].to(torch.int32),
        cu_k=packed[n : 2 * n].to(torch.int32),
        max_q=max(qlen for _, qlen, _, _ in chunks),
        max_k=max(ctx for _, _, ctx, _ in chunks),
        kv_slots=None if fresh else packed[2 * n :],
    )


def gather_rows(table: torch.Tensor, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """table.index_select(0, index) in `dtype`. An FP8 cache is gathered as bytes (the same
    values, whatever FP8 indexing a torch build supports) and then widened."""
    if table.dtype.itemsize == 1:
        return table.view(torch.uint8).index_select(0, index).view(table.dtype).to(dtype)
    return table.index_select(0, index)


def prefill_attention(qkv: torch.Tensor, cache: torch.Tensor, inputs: PrefillInputs, heads: int, kv_heads: int,
                      head_dim: int, scale: float, sliding_window: int | None) -> torch.Tensor:
    """Attention output [inputs.rows, heads * head_dim] of the prefill rows of qkv
    [T, (heads + 2 kv_heads) * head_dim] (q and k already rotated). cache: one layer's
    [blocks, block_size, 2 * kv_heads, head_dim], keys first."""
    H, KVH, D = heads, kv_heads, head_dim
    rows = qkv[inputs.start : inputs.start + inputs.rows]
    q = rows[:, : H * D].unflatten(-1, (H, D))
    if inputs.kv_slots is None:
        k = rows[:, H * D : (H + KVH) * D].unflatten(-1, (KVH, D))
        v = rows[:, (H + KVH) * D :].unflatten(-1, (KVH, D))
    else:
        kv = gather_rows(cache.flatten(0, 1), inputs.kv_slots, q.dtype)  # [keys, 2 KVH, D]
        k, v = kv[:, :KVH], kv[:, KVH:]
    # (left, 0): causal; left = W - 1 keeps W keys, transformers' sliding window.
    window = (sliding_window - 1 if sliding_window is not None else -1, 0)
    out = _varlen_attn()(q, k, v, inputs.cu_q, inputs.cu_k, inputs.max_q, inputs.max_k, scale=scale,
                         window_size=window)
    return out.flatten(1)
