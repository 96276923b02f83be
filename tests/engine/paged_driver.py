"""Hand-built ForwardBatches for runtime tests: a minimal stand-in for the scheduler.

Blocks are handed out from a shuffled free list so that block tables are not the
identity and any indexing mistake in the paged cache shows up as wrong logits.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from engine.runtime.base import ForwardBatch


@dataclass
class Seq:
    tokens: list[int]  # every token fed so far plus those about to be fed
    fed: int = 0  # tokens whose K/V are in the cache
    table: list[int] = field(default_factory=list)


class Pager:
    def __init__(self, num_blocks: int, block_size: int, seed: int = 0):
        self.block_size = block_size
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)

    def reserve(self, seq: Seq, length: int) -> None:
        while len(seq.table) * self.block_size < length:
            seq.table.append(self.free.pop())

    def slot(self, seq: Seq, pos: int) -> int:
        return seq.table[pos // self.block_size] * self.block_size + pos % self.block_size


def step(runtime, pager: Pager, decodes: list[Seq], prefills: list[tuple[Seq, int]]) -> torch.Tensor:
    """One forward pass: one new token for each decode seq, then `n` tokens of each
    (seq, n) prefill chunk. Returns logits of every seq's last fed token, in order."""
    ids, positions, slots, last = [], [], [], []
    chunks = []
    work = [(s, 1) for s in decodes] + list(prefills)
    for i, (seq, n) in enumerate(work):
        start = seq.fed
        pager.reserve(seq, start + n)
        if i >= len(decodes):
            chunks.append((len(ids), n, start + n, list(seq.table)))
        ids += seq.tokens[start : start + n]
        positions += range(start, start + n)
        slots += [pager.slot(seq, p) for p in range(start, start + n)]
        last.append(len(ids) - 1)
        seq.fed += n
    width = max((len(s.table) for s in decodes), default=0)
    tables = [s.table + [0] * (width - len(s.table)) for s in decodes]
    batch = ForwardBatch(
        input_ids=torch.tensor(ids),
        positions=torch.tensor(positions),
        slot_mapping=torch.tensor(slots),
        num_decodes=len(decodes),
        decode_block_tables=torch.tensor(tables, dtype=torch.int32).reshape(len(decodes), width),
        decode_context_lens=torch.tensor([s.fed for s in decodes], dtype=torch.int64),
        prefill_chunks=chunks,
        logits_indices=torch.tensor(last),
    )
    return runtime.execute(batch)
