from engine.block_manager import BlockManager, BlockTable


def test_allocate_and_free_returns_every_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    table = BlockTable()
    assert bm.slots_needed(table, 0, 10) == 3
    assert bm.allocate(table, 0, 10) == []
    assert len(table.blocks) == 3 and bm.num_free_blocks == 5
    bm.allocate(table, 10, 2)  # fills block 3 up to 12 slots: no new block
    assert len(table.blocks) == 3
    bm.allocate(table, 12, 1)
    assert len(table.blocks) == 4
    bm.free(table)
    assert bm.num_free_blocks == 8 and table.blocks == []


def test_prefix_reuse_by_chained_hash():
    bm = BlockManager(num_blocks=8, block_size=4)
    prompt = list(range(10))
    a = BlockTable()
    bm.allocate(a, 0, len(prompt))
    bm.register_full_blocks(a, prompt, num_computed=10)
    assert a.num_hashed == 2  # only full blocks are hashed

    b = BlockTable()
    assert bm.match_prefix(b, prompt) == 8
    assert b.blocks == a.blocks[:2]
    assert bm.blocks[a.blocks[0]].ref_count == 2

    # Same second block content after a different first block: no match past block 0.
    c = BlockTable()
    other = [0, 1, 2, 99] + prompt[4:]
    assert bm.match_prefix(c, other) == 0


def test_match_leaves_one_token_to_compute():
    bm = BlockManager(num_blocks=8, block_size=4)
    prompt = list(range(8))
    a = BlockTable()
    bm.allocate(a, 0, 8)
    bm.register_full_blocks(a, prompt, 8)
    b = BlockTable()
    assert bm.match_prefix(b, prompt) == 4  # the last block is recomputed for its logits


def test_freed_blocks_stay_cached_until_reused():
    bm = BlockManager(num_blocks=4, block_size=2)
    prompt = [5, 6, 7, 8, 9]
    a = BlockTable()
    bm.allocate(a, 0, 5)
    bm.register_full_blocks(a, prompt, 5)
    bm.free(a)
    assert bm.num_free_blocks == 4
    b = BlockTable()
    assert bm.match_prefix(b, prompt) == 4
    bm.free(b)
    # Take every block: cached content is evicted and no longer matches.
    c = BlockTable()
    bm.allocate(c, 0, 8)
    bm.free(c)
    d = BlockTable()
    assert bm.match_prefix(d, prompt) == 0


def test_fork_shares_blocks_and_copies_on_write():
    bm = BlockManager(num_blocks=8, block_size=4)
    parent = BlockTable()
    bm.allocate(parent, 0, 6)  # one full block and a half-full one
    child = bm.fork(parent)
    assert child.blocks == parent.blocks
    assert bm.slots_needed(child, 6, 1) == 1  # the shared partial block must be copied
    copies = bm.allocate(child, 6, 1)
    assert len(copies) == 1 and copies[0][0] == parent.blocks[1] and child.blocks[1] == copies[0][1]
    assert child.blocks[0] == parent.blocks[0]
    # The parent is now the only owner of its partial block: no copy for it.
    assert bm.allocate(parent, 6, 1) == []
    bm.free(child)
    bm.free(parent)
    assert bm.num_free_blocks == 8
