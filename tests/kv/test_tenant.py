"""Tenant roots of the prefix-hash chain: one tenant's cached blocks are never another's."""
from __future__ import annotations

import pytest

from kvmm_daemon.kv.block_hash import hash_block
from kvmm_daemon.kv.block_pool import BlockPool
from kvmm_daemon.kv.kv_manager import KVCacheManager
from kvmm_daemon.kv.tenant import LOCAL_SALT, SHARED_SALT, root_hash, tenant_root, tenant_salt

TOKENS = list(range(1, 18))           # 4 full blocks of 4 + 1


def _kv() -> KVCacheManager:
    return KVCacheManager(BlockPool(32), block_size=4, model_id="m")


def test_salts_and_roots_differ_per_uid_and_mode():
    assert tenant_salt(1000) == b"uid:1000" and tenant_salt(None) == LOCAL_SALT
    assert tenant_salt(1000, shared=True) == tenant_salt(0, shared=True) == SHARED_SALT
    roots = {tenant_root(u) for u in (0, 1000, 1001, None)} | {tenant_root(5, shared=True)}
    assert len(roots) == 5 and all(len(r) == 32 for r in roots)
    assert root_hash(b"uid:1000") != hash_block(None, [], "m")
    for bad in (-1, "1000", True, 1.5):
        with pytest.raises(ValueError):
            tenant_salt(bad)


def test_a_prefix_hit_needs_the_same_tenant():
    kv = _kv()
    a, b = tenant_root(1000), tenant_root(1001)
    kv.allocate("a1", TOKENS, a)
    kv.commit("a1", len(TOKENS))
    kv.free("a1")
    assert kv.allocate("b1", TOKENS, b).num_cached_tokens == 0      # other uid: a miss
    assert kv.allocate("a2", TOKENS, a).num_cached_tokens == 16     # same uid: hits
    assert kv.allocate("n1", TOKENS).num_cached_tokens == 0         # unsalted chain: a miss
    assert kv.root_hash("a2") == a and kv.block_hashes("a2")[0] == hash_block(a, TOKENS[:4], "m")


def test_forked_sequences_keep_their_root():
    kv = _kv()
    root = tenant_root(7)
    kv.allocate("p", TOKENS[:8], root)
    kv.commit("p", 8)
    kv.fork("p", "c")
    kv.append_slots("c", [1, 2, 3, 4])
    kv.commit("c", 4)
    assert kv.root_hash("c") == root
    assert kv.block_hashes("c")[0] == hash_block(root, TOKENS[:4], "m")
