"""Turns a SchedulerOutput into the runtime's ForwardBatch."""

from __future__ import annotations

import torch

from engine.runtime.base import ForwardBatch
from engine.scheduler import SchedulerOutput


def build_forward_batch(out: SchedulerOutput, block_size: int, device: torch.device) -> ForwardBatch:
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    logits_indices: list[int] = []
    prefill_chunks = []
    decode_tables: list[list[int]] = []
    decode_lens: list[int] = []
    for i, s in enumerate(out.scheduled):
        seq = s.seq
        start, end = seq.num_computed, seq.num_computed + s.num_tokens
        query_start = len(input_ids)
        blocks = seq.table.blocks
        input_ids.extend(seq.token_ids[start:end])
        positions.extend(range(start, end))
        slots.extend(blocks[p // block_size] * block_size + p % block_size for p in range(start, end))
        if i < out.num_decodes:
            decode_tables.append(blocks)
            decode_lens.append(end)
        else:
            prefill_chunks.append((query_start, s.num_tokens, end, blocks))
        if s.sample:
            logits_indices.append(len(input_ids) - 1)

    width = max((len(t) for t in decode_tables), default=0)
    flat_tables = [b for t in decode_tables for b in t + [0] * (width - len(t))]
    parts = [input_ids, positions, slots, flat_tables, decode_lens, logits_indices]
    # One host tensor, one copy: on CUDA from pinned memory without blocking, so building
    # a step's inputs never waits for the device.
    packed = torch.tensor([v for part in parts for v in part], dtype=torch.int64)
    if device.type == "cuda":
        packed = packed.pin_memory().to(device, non_blocking=True)
    elif packed.device != device:
        packed = packed.to(device)
    views = list(packed.split([len(p) for p in parts]))

    return ForwardBatch(
        input_ids=views[0],
        positions=views[1],
        slot_mapping=views[2],
        num_decodes=out.num_decodes,
        decode_block_tables=views[3].view(len(decode_tables), width),
        decode_context_lens=views[4],
        prefill_chunks=prefill_chunks,
        logits_indices=views[5],
    )
