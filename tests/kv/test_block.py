from kvmm_daemon.kv.block import KVBlock


def test_new_block_is_free_unqueued_and_unhashed():
    b = KVBlock(7)
    assert (b.block_id, b.ref_cnt, b.block_hash) == (7, 0, None)
    assert not b.is_queued
    assert not b.is_cached


def test_cached_means_unreferenced_with_hash():
    b = KVBlock(0, block_hash=b"h" * 32)
    assert b.is_cached
    b.ref_cnt = 1
    assert not b.is_cached


def test_queued_follows_links():
    a, b = KVBlock(0), KVBlock(1)
    a.prev = b
    assert a.is_queued and not b.is_queued


def test_equality_is_identity():
    assert KVBlock(3) != KVBlock(3)
    b = KVBlock(3)
    assert b == b
    assert len({KVBlock(1), KVBlock(1)}) == 2
