import os
import subprocess
import sys

import pytest

from kvmm_daemon.kv.block_hash import hash_full_blocks
from kvmm_daemon.kv.block_pool import BlockPool
from kvmm_daemon.kv.kv_manager import AllocResult, KVCacheManager

BS = 4


def make(num_blocks=8, on_evict=None):
    return KVCacheManager(BlockPool(num_blocks, on_evict=on_evict), BS, "test-model")


def prefill(mgr, seq_id, tokens):
    """Allocate and 'compute' the whole prompt; returns the AllocResult."""
    res = mgr.allocate(seq_id, tokens)
    assert res is not None
    mgr.commit(seq_id, len(tokens) - res.num_cached_tokens)
    return res


def test_allocate_covers_prompt_and_maps_slots():
    mgr = make()
    res = mgr.allocate("a", list(range(10)))
    assert res == AllocResult(num_cached_tokens=0, block_table=(0, 1, 2))
    assert mgr.block_table("a") == [0, 1, 2]
    assert mgr.num_tokens("a") == 10 and mgr.num_computed_tokens("a") == 0
    assert mgr.slot("a", 0) == 0 and mgr.slot("a", 9) == 2 * BS + 1
    assert mgr.slot_mapping("a", 3, 6) == [3, 4, 5]
    assert "a" in mgr and len(mgr) == 1
    with pytest.raises(IndexError):
        mgr.slot("a", 10)
    with pytest.raises(IndexError):
        mgr.slot_mapping("a", 5, 11)


def test_prefix_hit_reuses_full_written_blocks():
    mgr = make()
    prefill(mgr, "a", list(range(10)))                # blocks 0,1 full, block 2 partial
    mgr.free("a")
    res = mgr.allocate("b", list(range(9)) + [99])
    assert res.num_cached_tokens == 8
    assert res.block_table[:2] == (0, 1)
    assert mgr.num_computed_tokens("b") == 8
    s = mgr.statistics().pool
    assert (s.prefix_queries, s.prefix_hits) == (2 + 2, 2)
    assert mgr.block_hashes("b") == hash_full_blocks(list(range(8)), BS, "test-model")


def test_last_token_is_never_served_from_cache():
    mgr = make()
    prefill(mgr, "a", list(range(8)))                 # exactly two full blocks
    mgr.free("a")
    res = mgr.allocate("b", list(range(8)))
    assert res.num_cached_tokens == 4                 # the second block is recomputed
    assert res.block_table[0] == 0 and res.block_table[1] != 1


def test_hit_on_a_block_in_use_shares_it():
    mgr = make()
    prefill(mgr, "a", list(range(6)))
    res = mgr.allocate("b", list(range(5)))
    assert res.num_cached_tokens == 4
    assert mgr.pool.blocks[0].ref_cnt == 2
    assert mgr.block_table("a")[0] == mgr.block_table("b")[0] == 0


def test_model_id_separates_prefixes():
    pool = BlockPool(8)
    m1 = KVCacheManager(pool, BS, "m1")
    m2 = KVCacheManager(pool, BS, "m2")
    prefill(m1, "a", list(range(9)))
    assert m2.allocate("b", list(range(9))).num_cached_tokens == 0


def test_uncommitted_blocks_are_not_cached():
    mgr = make()
    mgr.allocate("a", list(range(9)))
    mgr.commit("a", 5)                                # only block 0 is written
    assert mgr.pool.blocks[0].block_hash is not None
    assert mgr.pool.blocks[1].block_hash is None
    assert mgr.allocate("b", list(range(9))).num_cached_tokens == 4


def test_shortage_returns_none_and_changes_nothing():
    mgr = make(num_blocks=3)
    prefill(mgr, "a", list(range(5)))                 # 2 blocks
    before = mgr.statistics()
    assert not mgr.can_allocate(5)
    assert mgr.allocate("b", [7] * 5) is None
    assert mgr.statistics() == before and "b" not in mgr
    assert mgr.can_allocate(4)


def test_revived_cached_hits_count_against_free_blocks():
    mgr = make(num_blocks=3)
    prefill(mgr, "a", list(range(9)))                 # blocks 0,1 cached after free
    mgr.free("a")
    other = mgr.allocate("x", [50])                   # takes the plain block 2
    assert other.block_table == (2,)
    # 2 hits to revive + 1 new block > 2 free blocks: refused, the cache stays intact
    assert mgr.allocate("b", list(range(9))) is None
    assert mgr.statistics().pool.blocks_cached == 2
    mgr.free("x")
    assert mgr.allocate("b", list(range(9))).num_cached_tokens == 8


def test_append_slots_fills_then_allocates():
    mgr = make()
    prefill(mgr, "a", list(range(3)))
    assert mgr.append_slots("a", [3]) == [3]          # fills block 0
    mgr.commit("a", 1)
    assert mgr.pool.blocks[0].block_hash is not None  # hashed once written
    slots = mgr.append_slots("a", [4, 5, 6, 7, 8])    # a chunk spanning two new blocks
    assert slots == [4, 5, 6, 7, 8]
    assert mgr.block_table("a") == [0, 1, 2]
    assert mgr.append_slots("a", []) == []
    assert mgr.num_tokens("a") == 9 and mgr.num_computed_tokens("a") == 4


def test_append_slots_none_when_short():
    mgr = make(num_blocks=2)
    prefill(mgr, "a", list(range(8)))
    before = mgr.statistics()
    assert not mgr.can_append("a", 1)
    assert mgr.append_slots("a", [8]) is None
    assert mgr.statistics() == before and mgr.num_tokens("a") == 8


def test_commit_bounds():
    mgr = make()
    mgr.allocate("a", [1, 2, 3])
    with pytest.raises(ValueError, match="only 3 reserved"):
        mgr.commit("a", 4)
    with pytest.raises(ValueError):
        mgr.commit("a", -1)


def test_fork_shares_and_copies_on_write():
    mgr = make()
    prefill(mgr, "p", list(range(6)))                 # block 0 full, block 1 holds 2 tokens
    mgr.fork("p", "c")
    assert mgr.block_table("c") == mgr.block_table("p") == [0, 1]
    assert [mgr.pool.blocks[i].ref_cnt for i in (0, 1)] == [2, 2]
    assert mgr.block_hashes("c") == mgr.block_hashes("p")
    slots = mgr.append_slots("c", [100])
    new = mgr.block_table("c")[1]
    assert new != 1 and slots == [new * BS + 2]
    assert mgr.statistics().pending_copies == 1
    # the parent is now the only table holder of block 1: it writes in place, no copy
    assert mgr.append_slots("p", [200]) == [1 * BS + 2]
    assert mgr.pinned_blocks() == {1: 1}
    assert mgr.pool.blocks[1].ref_cnt == 2            # parent's table + the pending copy
    assert mgr.take_pending_copies() == [(1, new)]
    assert mgr.pool.blocks[1].ref_cnt == 1 and mgr.pinned_blocks() == {}
    assert mgr.take_pending_copies() == []


def test_fork_of_a_block_aligned_sequence_needs_no_copy():
    mgr = make()
    prefill(mgr, "p", list(range(8)))
    mgr.fork("p", "c")
    assert mgr.append_slots("c", [1]) == [mgr.block_table("c")[2] * BS]
    assert mgr.take_pending_copies() == []


def test_fork_refuses_uncommitted_tokens_and_duplicates():
    mgr = make()
    mgr.allocate("p", [1, 2, 3])
    with pytest.raises(ValueError, match="uncommitted"):
        mgr.fork("p", "c")
    mgr.commit("p", 3)
    mgr.fork("p", "c")
    with pytest.raises(ValueError, match="already has KV"):
        mgr.fork("p", "c")


def test_free_drops_copies_into_dead_blocks_and_unpins():
    mgr = make(num_blocks=4)
    prefill(mgr, "p", list(range(6)))
    mgr.fork("p", "c")
    mgr.append_slots("c", [9])                        # CoW pending: 1 -> new
    mgr.free("c")                                     # preempted before the step ran
    assert mgr.take_pending_copies() == []
    assert mgr.pool.blocks[1].ref_cnt == 1
    mgr.free("p")
    assert mgr.statistics().pool.blocks_allocated == 0


def test_free_releases_tail_first():
    mgr = make(num_blocks=4)
    prefill(mgr, "a", list(range(13)))                # 3 full cached blocks + 1 partial
    mgr.free("a")
    # partial block (plain) first, then the cached ones longest prefix first
    assert mgr.pool.free_queue_order() == [3, 2, 1, 0]
    assert mgr.statistics().pool.blocks_cached == 3


def test_unknown_and_duplicate_sequences():
    mgr = make()
    with pytest.raises(KeyError, match="unknown sequence 'z'"):
        mgr.free("z")
    with pytest.raises(KeyError):
        mgr.block_table("z")
    mgr.allocate("a", [1])
    with pytest.raises(ValueError, match="already has KV"):
        mgr.allocate("a", [1])
    with pytest.raises(ValueError, match="empty prompt"):
        mgr.allocate("b", [])
    with pytest.raises(ValueError):
        KVCacheManager(BlockPool(1), 0, "m")


def test_statistics_counts_sequences():
    mgr = make()
    prefill(mgr, "a", [1, 2])
    mgr.fork("a", "b")
    s = mgr.statistics()
    assert s.num_seqs == 2 and s.pool.blocks_allocated == 1 and s.pending_copies == 0


_CHILD = """
from kvmm_daemon.kv.block_pool import BlockPool
from kvmm_daemon.kv.kv_manager import KVCacheManager
m = KVCacheManager(BlockPool(8), 4, "test-model")
m.allocate(0, list(range(13)))
m.commit(0, 13)
print(",".join(h.hex() for h in m.block_hashes(0)))
"""


def test_prefix_keys_match_across_processes():
    """A prefix cached by one process (and kept on flash) is found by the next one."""
    out = subprocess.run([sys.executable, "-c", _CHILD], check=True, capture_output=True,
                         text=True, env=dict(os.environ, PYTHONHASHSEED="7")).stdout.strip()
    mgr = make()
    prefill(mgr, "a", list(range(13)))
    assert out.split(",") == [h.hex() for h in mgr.block_hashes("a")]
