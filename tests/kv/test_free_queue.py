import pytest

from kvmm_daemon.kv.block import KVBlock
from kvmm_daemon.kv.free_queue import FreeBlockQueue, FreeQueueStats

H = [bytes([i]) * 32 for i in range(8)]


def ids(q):
    return [b.block_id for b in q]


def test_initial_order_and_popleft():
    blocks = [KVBlock(i) for i in range(4)]
    q = FreeBlockQueue(blocks)
    assert len(q) == 4 and ids(q) == [0, 1, 2, 3]
    assert all(b.is_queued for b in blocks)
    assert [q.popleft().block_id for _ in range(4)] == [0, 1, 2, 3]
    assert len(q) == 0 and not any(b.is_queued for b in blocks)
    with pytest.raises(IndexError):
        q.popleft()


def test_free_blocks_go_front_cached_blocks_go_back():
    q = FreeBlockQueue()
    cached_old = KVBlock(0, block_hash=H[0])
    q.append(cached_old)
    plain = KVBlock(1)
    q.append(plain)
    cached_new = KVBlock(2, block_hash=H[2])
    q.append(cached_new)
    plain2 = KVBlock(3)
    q.append(plain2)
    # plain blocks first (most recently freed first among them), then cached LRU
    assert ids(q) == [3, 1, 0, 2]
    assert q.statistics() == FreeQueueStats(num_queued=4, num_cached=2)
    assert q.popleft() is plain2
    assert q.popleft() is plain
    assert q.popleft() is cached_old      # evicted only when no plain block is left
    assert q.num_cached == 1


def test_cached_blocks_are_lru():
    q = FreeBlockQueue()
    blocks = [KVBlock(i, block_hash=H[i]) for i in range(3)]
    for b in blocks:
        q.append(b)
    q.remove(blocks[0])           # a prefix hit ...
    q.append(blocks[0])           # ... and its release makes it most recently used
    assert ids(q) == [1, 2, 0]


def test_remove_anywhere_keeps_links():
    blocks = [KVBlock(i) for i in range(5)]
    q = FreeBlockQueue(blocks)
    q.remove(blocks[2])
    q.remove(blocks[0])
    q.remove(blocks[4])
    assert ids(q) == [1, 3] and len(q) == 2
    assert not blocks[2].is_queued
    q.remove(blocks[1])
    q.remove(blocks[3])
    assert ids(q) == [] and len(q) == 0
    q.append(blocks[2])
    assert ids(q) == [2]


def test_remove_cached_updates_count():
    c = KVBlock(0, block_hash=H[0])
    q = FreeBlockQueue([KVBlock(1), c])
    assert q.num_cached == 1
    q.remove(c)
    assert q.num_cached == 0 and len(q) == 1


def test_misuse_is_caught_by_assertions():
    b = KVBlock(0)
    q = FreeBlockQueue([b])
    with pytest.raises(AssertionError):
        q.append(b)               # already queued
    with pytest.raises(AssertionError):
        q.remove(KVBlock(1))      # never queued
    busy = KVBlock(2, ref_cnt=1)
    with pytest.raises(AssertionError):
        q.append(busy)
