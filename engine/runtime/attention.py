"""Paged attention in plain torch.

KV cache layout, per layer: [num_blocks, block_size, 2 * num_kv_heads, head_dim], keys in
heads [:num_kv_heads] and values in [num_kv_heads:]. Keys and values side by side per
token match the k|v tail of the fused qkv projection, so a step's new K/V go into the
cache with one index_copy_ over flat slots (block_id * block_size + offset), and a
sequence's context comes back with one gather, not two. Token-major blocks let a gathered
block table reshape to [seqs, tokens, heads, head_dim] without a copy.

Per forward pass `AttentionMetadata` is built once from the ForwardBatch (masks,
block-table tensors) and shared by every layer, so the per-layer work is only tensor ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.runtime.base import ForwardBatch
from engine.transfer import to_device


@dataclass
class PrefillChunk:
    start: int  # first row of the chunk in the batch
    query_len: int
    context_len: int  # KV tokens after this step, cached prefix included
    block_ids: torch.Tensor | None  # [blocks] int64; None when the chunk has no cached prefix
    # [query_len, context_len] additive mask (0 or -inf), or None for a plain causal mask.
    mask: torch.Tensor | None


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64
    num_decodes: int
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks] int64
    # [num_decodes, 1, 1, max_blocks * block_size] additive (0 or -inf), in the model dtype:
    # SDPA would otherwise convert a bool mask in every layer.
    decode_mask: torch.Tensor
    prefill: list[PrefillChunk]


def _window_mask(query_pos: torch.Tensor, kv_pos: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    # transformers' rule: attend to kv_idx <= q_idx and, with a window, kv_idx > q_idx - window.
    mask = kv_pos <= query_pos
    if sliding_window is not None:
        mask &= kv_pos > query_pos - sliding_window
    return mask


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def build_metadata(batch: ForwardBatch, block_size: int, sliding_window: int | None = None,
                   dtype: torch.dtype = torch.float32) -> AttentionMetadata:
    device = batch.input_ids.device
    tables = batch.decode_block_tables.to(device=device, dtype=torch.int64).contiguous()
    # Decode masks come from tensors only (no Python values), so the step keeps static
    # shapes for a given (batch, max_blocks) and can be captured in a CUDA graph later.
    kv_pos = torch.arange(tables.shape[1] * block_size, device=device)
    query_pos = (batch.decode_context_lens.to(device) - 1)[:, None]
    decode_mask = _additive(_window_mask(query_pos, kv_pos[None, :], sliding_window), dtype)[:, None, None, :]

    chunks = []
    for start, query_len, context_len, blocks in batch.prefill_chunks:
        offset = context_len - query_len
        used = blocks[: -(-context_len // block_size)]  # tables may hold blocks reserved ahead
        block_ids = None if offset == 0 else to_device(used, torch.int64, device)
        mask = None
        if offset != 0 or sliding_window is not None:
            q_pos = torch.arange(offset, context_len, device=device)[:, None]
            mask = _additive(_window_mask(q_pos, torch.arange(context_len, device=device)[None, :], sliding_window), dtype)
        chunks.append(PrefillChunk(start, query_len, context_len, block_ids, mask))
    return AttentionMetadata(batch.slot_mapping, batch.num_decodes, tables, decode_mask, chunks)


def _decode(q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """All decode tokens at once: q [B, heads, head_dim] -> [B, heads * head_dim]."""
    n, heads, head_dim = q.shape
    kv_heads = cache.shape[2] // 2
    # index_select over flat block ids: a row-wise copy, ~3x faster on CPU than cache[tables].
    kv = cache.index_select(0, meta.decode_block_tables.view(-1)).view(n, -1, 2 * kv_heads, head_dim)
    keys = kv[:, :, :kv_heads].transpose(1, 2)  # [B, kv_heads, L, d]
    values = kv[:, :, kv_heads:].transpose(1, 2)
    # One query per sequence, so the query heads sharing a KV head can stand in for the
    # query axis: [B, kv_heads, group, d] against [B, kv_heads, L, d]. This is GQA with
    # no repeat of K/V and no enable_gqa path (query head h uses KV head h // group, as
    # in transformers' repeat_kv).
    grouped = q.view(n, kv_heads, heads // kv_heads, head_dim)
    out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=meta.decode_mask, scale=scale)
    return out.reshape(n, heads * head_dim)


def _prefill(q: torch.Tensor, kv: torch.Tensor, cache: torch.Tensor, chunk: PrefillChunk,
             scale: float) -> torch.Tensor:
    """One chunk: q [Q, heads, d] -> [Q, heads * d]."""
    rows = slice(chunk.start, chunk.start + chunk.query_len)
    if chunk.block_ids is None:  # no cached prefix: the chunk's own fresh K/V are the context
        context = kv[rows]
    else:
        context = cache.index_select(0, chunk.block_ids).flatten(0, 1)[: chunk.context_len]
    kv_heads = kv.shape[1] // 2
    keys, values = context[:, :kv_heads], context[:, kv_heads:]
    out = F.scaled_dot_product_attention(
        q[rows].transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1),
        attn_mask=chunk.mask, is_causal=chunk.mask is None, scale=scale, enable_gqa=True,
    )  # [heads, Q, d]
    return out.transpose(0, 1).reshape(chunk.query_len, -1)


def paged_attention(q: torch.Tensor, kv: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float) -> torch.Tensor:
    """Write the step's K/V to the cache, then attend.

    q [T, heads, d]; kv [T, 2 * kv_heads, d] (keys then values); cache: one layer's
    [num_blocks, block_size, 2 * kv_heads, d]. Returns [T, heads * d].
    """
    cache.view(-1, kv.shape[1], kv.shape[2]).index_copy_(0, meta.slot_mapping, kv)
    n = meta.num_decodes
    if not meta.prefill:
        return _decode(q, cache, meta, scale)
    if n == 0 and len(meta.prefill) == 1:
        return _prefill(q, kv, cache, meta.prefill[0], scale)
    out = q.new_empty(q.shape[0], q.shape[1] * q.shape[2])
    if n:
        out[:n] = _decode(q[:n], cache, meta, scale)
    for chunk in meta.prefill:
        out[chunk.start : chunk.start + chunk.query_len] = _prefill(q, kv, cache, chunk, scale)
    return out
