"""Paged KV-cache bookkeeping: block allocation, reference counts, prefix reuse.

A sequence owns a block table: block ids covering its tokens in order. Blocks are
shared (reference-counted) between sequences that fork (beams, num_return_sequences)
and between requests with a common prompt prefix.

Prefix reuse: once a block is full and its KV computed, it is registered under a
chained hash of (previous block's hash, this block's token ids), so the hash stands
for the whole prefix up to and including the block. A freed block keeps its hash
and content until the allocator hands it out again (least recently freed first),
so a later request with the same prefix can pick it back up.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass(eq=False)
class Block:
    block_id: int
    ref_count: int = 0
    # Set once the block is full and computed; with `tokens`, the prefix-cache key.
    hash: int | None = None
    tokens: tuple[int, ...] = ()


@dataclass(eq=False)
class BlockTable:
    """A sequence's view of the pool: its blocks and how many of them are hashed."""

    blocks: list[int] = field(default_factory=list)
    num_hashed: int = 0
    last_hash: int | None = None

    def copy(self) -> "BlockTable":
        return BlockTable(list(self.blocks), self.num_hashed, self.last_hash)


def chain_hash(prev_hash: int | None, tokens: tuple[int, ...]) -> int:
    return hash((prev_hash, tokens))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Blocks with ref_count 0, oldest-freed first. Their content may still be cached.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[int, int] = {}  # hash -> block id

    # ---- counters -------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return len(self.blocks) - len(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- allocation -----------------------------------------------------------------
    def _take_free_block(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:  # evict its cached content
            if self._cached.get(block.hash) == block_id:
                del self._cached[block.hash]
            block.hash, block.tokens = None, ()
        block.ref_count = 1
        return block_id

    def _incref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def _decref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        assert block.ref_count >= 0, f"block {block_id} freed twice"
        if block.ref_count == 0:
            self._free[block_id] = None

    def match_prefix(self, table: BlockTable, token_ids: list[int]) -> int:
        """Attach cached blocks for the longest cached prefix of token_ids to an empty table.

        Returns the number of tokens whose KV is reused. At least one token is left to
        compute, because the last prompt token's logits are needed.
        """
        assert not table.blocks
        bs = self.block_size
        max_blocks = (len(token_ids) - 1) // bs
        if not self.enable_prefix_caching:
            return 0
        prev = None
        for i in range(max_blocks):
            tokens = tuple(token_ids[i * bs : (i + 1) * bs])
            h = chain_hash(prev, tokens)
            block_id = self._cached.get(h)
            if block_id is None or self.blocks[block_id].tokens != tokens:
                break
            self._incref(block_id)
            table.blocks.append(block_id)
            prev = h
        table.num_hashed = len(table.blocks)
        table.last_hash = prev
        return len(table.blocks) * bs

    def slots_needed(self, table: BlockTable, num_computed: int, num_new_tokens: int) -> int:
        """Free blocks that appending num_new_tokens after num_computed would take."""
        blocks, bs = table.blocks, self.block_size
        need = max(0, -(-(num_computed + num_new_tokens) // bs) - len(blocks))
        index = num_computed // bs  # copy-on-write of the block written first (see allocate)
        if index < len(blocks) and self.blocks[blocks[index]].ref_count > 1:
            need += 1
        return need

    def _needs_copy_on_write(self, table: BlockTable, num_computed: int) -> bool:
        index = num_computed // self.block_size
        return index < len(table.blocks) and self.blocks[table.blocks[index]].ref_count > 1

    def can_allocate(self, table: BlockTable, num_computed: int, num_new_tokens: int) -> bool:
        return self.slots_needed(table, num_computed, num_new_tokens) <= self.num_free_blocks

    def allocate(self, table: BlockTable, num_computed: int, num_new_tokens: int) -> list[tuple[int, int]]:
        """Make the table cover num_computed + num_new_tokens slots.

        Returns (src, dst) block copies the runtime must do before the forward pass:
        a block shared with another sequence is copied before this one writes into it.
        """
        copies = []
        if self._needs_copy_on_write(table, num_computed):
            index = num_computed // self.block_size
            src = table.blocks[index]
            dst = self._take_free_block()
            self._decref(src)
            table.blocks[index] = dst
            copies.append((src, dst))
        for _ in range(self.blocks_needed(num_computed + num_new_tokens) - len(table.blocks)):
            table.blocks.append(self._take_free_block())
        return copies

    def fork(self, table: BlockTable) -> BlockTable:
        """A new table sharing every block of `table` (copy-on-write on the next write)."""
        for block_id in table.blocks:
            self._incref(block_id)
        return table.copy()

    def free(self, table: BlockTable) -> None:
        # Free the tail first so that a prefix's later blocks are evicted before its head.
        for block_id in reversed(table.blocks):
            self._decref(block_id)
        table.blocks.clear()
        table.num_hashed, table.last_hash = 0, None

    # ---- prefix registration ----------------------------------------------------------
    def register_full_blocks(self, table: BlockTable, token_ids: list[int], num_computed: int) -> None:
        """Hash the blocks that became full and computed, making them reusable.

        A block whose last token is still in flight (computed, id not yet read back)
        waits for the next call: its hash needs every token."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = min(num_computed, len(token_ids)) // bs
        if full <= table.num_hashed:  # most calls: no block filled up since the last one
            return
        full = min(full, len(table.blocks))
        for i in range(table.num_hashed, full):
            tokens = tuple(token_ids[i * bs : (i + 1) * bs])
            h = chain_hash(table.last_hash, tokens)
            block = self.blocks[table.blocks[i]]
            if block.hash is None:
                block.hash, block.tokens = h, tokens
                # The first computed copy of a prefix wins; duplicates stay private.
                self._cached.setdefault(h, block.block_id)
            table.last_hash = h
            table.num_hashed = i + 1
