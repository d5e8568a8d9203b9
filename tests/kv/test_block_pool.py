import logging

import pytest

from kvmm_daemon.kv.block_pool import BlockPool, BlockPoolStats

H = [bytes([i]) * 32 for i in range(16)]


def test_fresh_pool():
    pool = BlockPool(4)
    assert pool.num_blocks == 4 and pool.num_free_blocks == 4
    assert [b.block_id for b in pool.blocks] == [0, 1, 2, 3]
    assert pool.statistics() == BlockPoolStats(
        blocks_total=4, blocks_allocated=0, blocks_cached=0, blocks_free=4,
        prefix_queries=0, prefix_hits=0, evictions=0, evict_hook_errors=0)
    with pytest.raises(ValueError):
        BlockPool(0)


def test_get_new_blocks_and_shortage_changes_nothing():
    pool = BlockPool(4)
    got = pool.get_new_blocks(3)
    assert [b.block_id for b in got] == [0, 1, 2]
    assert all(b.ref_cnt == 1 and not b.is_queued for b in got)
    before = pool.statistics()
    assert pool.get_new_blocks(2) is None
    assert pool.statistics() == before and pool.num_free_blocks == 1
    assert pool.get_new_blocks(0) == []
    with pytest.raises(ValueError):
        pool.get_new_blocks(-1)


def test_free_returns_blocks_and_counts_references():
    pool = BlockPool(2)
    a, b = pool.get_new_blocks(2)
    pool.touch([a])                                   # a second holder
    pool.free_blocks([a, b])
    assert a.ref_cnt == 1 and b.ref_cnt == 0 and pool.num_free_blocks == 1
    pool.free_blocks([a])
    assert pool.statistics().blocks_free == 2
    with pytest.raises(ValueError, match="freed more often"):
        pool.free_blocks([a])


def test_cached_block_survives_free_and_is_revived_by_touch():
    pool = BlockPool(3)
    a, = pool.get_new_blocks(1)
    assert pool.cache_full_block(a, H[1])
    assert pool.get_cached_block(H[1]) is a           # findable while in use
    pool.free_blocks([a])
    s = pool.statistics()
    assert (s.blocks_allocated, s.blocks_cached, s.blocks_free) == (0, 1, 2)
    assert pool.get_cached_block(H[1]) is a and a.is_cached
    pool.touch([a])
    assert a.ref_cnt == 1 and not a.is_queued and pool.num_free_blocks == 2
    assert pool.statistics().blocks_cached == 0


def test_touching_a_free_block_is_refused():
    pool = BlockPool(2)
    with pytest.raises(ValueError, match="is free"):
        pool.touch([pool.blocks[0]])


def test_cache_full_block_rules():
    pool = BlockPool(3)
    a, b = pool.get_new_blocks(2)
    assert pool.cache_full_block(a, H[0])
    assert not pool.cache_full_block(b, H[0])         # duplicate content stays uncached
    assert b.block_hash is None and pool.get_cached_block(H[0]) is a
    with pytest.raises(ValueError, match="already cached"):
        pool.cache_full_block(a, H[2])
    with pytest.raises(ValueError, match="not allocated"):
        pool.cache_full_block(pool.blocks[2], H[3])


def test_eviction_takes_free_blocks_first_then_lru_cached_tail_first():
    evicted = []
    pool = BlockPool(5, on_evict=lambda blk, h: evicted.append(
        (blk.block_id, h, blk.block_hash == h, pool.get_cached_block(h) is blk)))
    seq = pool.get_new_blocks(3)                      # blocks 0,1,2 hold a 3-block prefix
    for blk, h in zip(seq, H):
        pool.cache_full_block(blk, h)
    pool.free_blocks(reversed(seq))                   # tail first, as the manager frees
    assert pool.free_queue_order() == [3, 4, 2, 1, 0]
    got = pool.get_new_blocks(3)
    assert [b.block_id for b in got] == [3, 4, 2]     # plain first, then the tail block
    # the hook ran while the hash was still attached and findable
    assert evicted == [(2, H[2], True, True)]
    assert got[2].block_hash is None and pool.get_cached_block(H[2]) is None
    assert pool.get_cached_block(H[0]) is pool.blocks[0]
    s = pool.statistics()
    assert (s.evictions, s.blocks_cached, s.blocks_allocated) == (1, 2, 3)


def test_failing_evict_hook_is_logged_and_counted(caplog):
    def hook(block, h):
        raise OSError("flash is full")
    pool = BlockPool(1, on_evict=hook)
    a, = pool.get_new_blocks(1)
    pool.cache_full_block(a, H[0])
    pool.free_blocks([a])
    with caplog.at_level(logging.ERROR, logger="kvmm_daemon.kv.block_pool"):
        got = pool.get_new_blocks(1)
    assert got == [a] and a.block_hash is None and a.ref_cnt == 1
    assert pool.get_cached_block(H[0]) is None
    s = pool.statistics()
    assert (s.evictions, s.evict_hook_errors) == (1, 1)
    assert "on_evict hook failed for block 0" in caplog.text


def test_prefix_lookup_counters():
    pool = BlockPool(1)
    pool.record_prefix_lookup(4, 3)
    pool.record_prefix_lookup(2, 0)
    s = pool.statistics()
    assert (s.prefix_queries, s.prefix_hits) == (6, 3)


def test_statistics_is_a_frozen_snapshot():
    pool = BlockPool(2)
    s = pool.statistics()
    pool.get_new_blocks(1)
    assert s.blocks_allocated == 0
    with pytest.raises(AttributeError):
        s.blocks_total = 3
