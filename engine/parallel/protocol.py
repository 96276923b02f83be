"""Messages between rank 0 and the tensor-parallel workers, over one pipe per worker.

Rank 0 -> worker (the step plan, in the order the engine makes the calls):
    ("init_kv_cache", num_blocks, block_size)   answered ("ok",)
    ("copy_blocks", [(src, dst), ...])
    ("execute", packed ForwardBatch)
    ("stop",)
Worker -> rank 0:
    ("ready",) once its shard is loaded; ("ok",) after init_kv_cache;
    ("error", text) before it exits on any failure.

The plan travels over pipes rather than a torch.distributed broadcast: a worker waits
for the next step for as long as the server is idle, which no collective timeout allows,
and a pipe gives the worker EOF when rank 0's process is gone, so it exits instead of
lingering. Tensors go as plain lists: torch.multiprocessing would move each small tensor
into a shared-memory file, which costs more than the copy.
"""

from __future__ import annotations

import torch

from engine.runtime.base import ForwardBatch


def pack_batch(batch: ForwardBatch) -> tuple:
    """What a worker needs to run the step: everything but logits_indices (no logits there)."""
    return (
        batch.input_ids.tolist(),
        batch.positions.tolist(),
        batch.slot_mapping.tolist(),
        batch.num_decodes,
        tuple(batch.decode_block_tables.shape),
        batch.decode_block_tables.flatten().tolist(),
        batch.decode_context_lens.tolist(),
        batch.prefill_chunks,
    )


def unpack_batch(packed: tuple, device: torch.device) -> ForwardBatch:
    input_ids, positions, slots, num_decodes, table_shape, tables, context_lens, chunks = packed

    def tensor(values):
        return torch.tensor(values, dtype=torch.int64, device=device)

    return ForwardBatch(
        input_ids=tensor(input_ids),
        positions=tensor(positions),
        slot_mapping=tensor(slots),
        num_decodes=num_decodes,
        decode_block_tables=tensor(tables).reshape(table_shape),
        decode_context_lens=tensor(context_lens),
        prefill_chunks=chunks,
        # Workers run the layers (and their all-reduces) but compute no logits: rank 0 does.
        logits_indices=tensor([]),
    )
