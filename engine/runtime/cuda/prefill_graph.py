"""Which steps the CUDA runtime replays from a prefill graph (no Triton here, so the CPU
tests can import it)."""

from __future__ import annotations

from engine.runtime.base import ForwardBatch


def prefill_graph_shape(batch: ForwardBatch, decode_buckets: list[int], lengths: list[int],
                        sliding_window: int | None) -> tuple[int, int] | None:
    """(decode rows, prompt tokens) of the prefill graph for a step whose prefill is one
    fresh prompt chunk after its decode rows, else None: the least of `decode_buckets`
    (sorted; 0 for a step without decode rows) that holds the decode rows and the least of
    `lengths` (sorted) that holds the chunk. Fresh: no cached prefix and no earlier chunk,
    so its keys are its own rows. With a sliding window, or after a prefix, the prefill
    attention's inputs are built on the host per step (engine/runtime/cuda/prefill.py),
    which a graph cannot take."""
    if len(batch.prefill_chunks) != 1 or sliding_window is not None:
        return None
    n = batch.num_decodes
    start, query_len, context_len, _ = batch.prefill_chunks[0]
    if start != n or context_len != query_len or batch.logits_indices.shape[0] > n + 1:
        return None
    rows = next((b for b in decode_buckets if b >= n), None)
    tokens = next((t for t in lengths if t >= query_len), None)
    if rows is None or tokens is None:
        return None
    return rows, tokens
