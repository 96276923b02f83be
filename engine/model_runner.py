"""Turns a SchedulerOutput into the runtime's ForwardBatch."""

from __future__ import annotations

import array
import functools
from dataclasses import dataclass

import torch

from engine.runtime.base import ForwardBatch, TokenFeed, apply_token_feed
from engine.scheduler import SchedulerOutput


@dataclass
class InflightTokens:
    """The tokens a launched step sampled, still on the device."""

    tokens: torch.Tensor  # [rows] int64
    rows: dict[int, int]  # seq_id -> its row in `tokens`


def build_forward_batch(out: SchedulerOutput, block_size: int, device: torch.device,
                        inflight: InflightTokens | None = None, defer_feed: bool = False) -> ForwardBatch:
    """A sequence whose last token is still in flight gets it from `inflight.tokens`
    by a copy on the device: the host never waits for it. With defer_feed the copy is left
    to the runtime (ForwardBatch.token_feed), which may fuse it into a kernel of its own."""
    input_ids: list[int] = []
    feed_to: list[int] = []
    feed_from: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    logits_indices: list[int] = []
    prefill_chunks = []
    decode_tables: list[list[int]] = []
    decode_lens: list[int] = []
    for i, s in enumerate(out.scheduled):
        seq = s.seq
        start, end = seq.num_computed, seq.num_computed + s.num_tokens
        blocks = seq.table.blocks
        if i < out.num_decodes:  # one token: the common case, kept short
            if start < len(seq.token_ids):
                input_ids.append(seq.token_ids[start])
            else:  # the token is in flight
                feed_to.append(len(input_ids))
                feed_from.append(_inflight_row(inflight, seq.seq_id))
                input_ids.append(0)
            positions.append(start)
            slots.append(blocks[start // block_size] * block_size + start % block_size)
            decode_tables.append(blocks)
            decode_lens.append(end)
            if s.sample:
                logits_indices.append(len(input_ids) - 1)
            continue
        query_start = len(input_ids)
        known = seq.token_ids[start:end]
        input_ids.extend(known)
        if len(known) < s.num_tokens:  # the last position's token is in flight
            feed_to.append(len(input_ids))
            feed_from.append(_inflight_row(inflight, seq.seq_id))
            input_ids.append(0)
        positions.extend(range(start, end))
        slots.extend(blocks[p // block_size] * block_size + p % block_size for p in range(start, end))
        prefill_chunks.append((query_start, s.num_tokens, end, blocks))
        if s.sample:
            logits_indices.append(len(input_ids) - 1)

    width = max((len(t) for t in decode_tables), default=0)
    flat_tables = array.array("q")
    for t in decode_tables:
        flat_tables.extend(t)
        if len(t) < width:
            flat_tables.extend(_zeros(width - len(t)))
    parts = [input_ids, positions, slots, flat_tables, decode_lens, logits_indices, feed_to, feed_from]
    # One host tensor, one copy: on CUDA from pinned memory without blocking, so building
    # a step's inputs never waits for the device. Packed through an array of int64 rather
    # than torch.tensor(list): four times faster, 0.5 ms a step at 256 rows.
    # Each part starts at a multiple of 16 bytes (an odd-length part is followed by one
    # unused int64): Triton specializes kernels on their pointers' 16-byte alignment, and
    # views at offsets that changed from step to step made kernels compile again while
    # serving (0.2 to 1.4 s stalls of the step loop on the H100, docs/benchmarks.md).
    host = array.array("q")
    sizes = []  # each part's length, then its padding's (0 or 1)
    for part in parts:
        host.extend(part)
        sizes += (len(part), len(part) % 2)
        if len(part) % 2:
            host.append(0)
    packed = torch.frombuffer(host, dtype=torch.int64)
    if device.type == "cuda":
        packed = packed.pin_memory().to(device, non_blocking=True)
    elif packed.device != device:
        packed = packed.to(device)
    views = packed.split(sizes)[::2]
    feed = TokenFeed(inflight.tokens, views[6], views[7]) if feed_to else None

    batch = ForwardBatch(
        input_ids=views[0],
        positions=views[1],
        slot_mapping=views[2],
        num_decodes=out.num_decodes,
        decode_block_tables=views[3].view(len(decode_tables), width),
        decode_context_lens=views[4],
        prefill_chunks=prefill_chunks,
        logits_indices=views[5],
        token_feed=feed,
    )
    if not defer_feed:
        apply_token_feed(batch)
    return batch


@functools.lru_cache(maxsize=64)
def _zeros(count: int) -> array.array:
    return array.array("q", bytes(8 * count))


def _inflight_row(inflight: InflightTokens | None, seq_id: int) -> int:
    if inflight is None or seq_id not in inflight.rows:
        raise RuntimeError(f"sequence {seq_id} has a token in flight that no launched step holds")
    return inflight.rows[seq_id]
