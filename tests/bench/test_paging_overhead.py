"""The paging-overhead grid of `kvmm bench decode`: real arena, real pool, same kernels."""
from __future__ import annotations

import torch

from kvmm_daemon.bench.paging_overhead import (CompactCopy, Geometry, paging_overhead,
                                               scattered_tables)
from kvmm_daemon.kv.kv_cache import KVCache


def test_scattered_tables_come_from_a_churned_pool():
    tables = scattered_tables(64, 4, 5, seed=1)
    ids = tables.reshape(-1).tolist()
    assert tables.shape == (4, 5) and tables.dtype == torch.int32
    assert len(set(ids)) == 20 and all(0 <= i < 64 for i in ids)
    assert ids != sorted(ids)                       # scattered, not handed out in order
    assert tables.tolist() == scattered_tables(64, 4, 5, seed=1).tolist()   # seeded


def test_compact_copy_holds_the_same_blocks_in_order():
    kv = KVCache(12, num_layers=2, block_size=4, num_kv_heads=2, head_dim=16)
    k, v = kv.layer(1)
    k.copy_(torch.randn(k.shape))
    v.copy_(torch.randn(v.shape))
    tables = scattered_tables(12, 2, 3, seed=0)
    copy = CompactCopy(k, v, tables)
    for i, block in enumerate(tables.reshape(-1).tolist()):
        assert torch.equal(copy.k_cache[i], k[block]) and torch.equal(copy.v_cache[i], v[block])
    uk, uv = copy.unpaged(2, 10)
    assert uk.shape == (2, 10, 2, 16)
    assert torch.equal(uv[1, 5], v[tables[1, 1]][1])
    copy.close()


def test_grid_rows_and_ratios():
    geo = Geometry(num_heads=4, num_kv_heads=2, head_dim=16, num_layers=3, block_size=4)
    res = paging_overhead(geo, batches=(1, 3), contexts=(9, 20), threads=(1,), rounds=1, reps=2,
                          layers=2)
    assert [(r["batch"], r["context"]) for r in res["rows"]] == [(1, 9), (1, 20), (3, 9), (3, 20)]
    assert "torch" in res["worst_overhead"]
    for r in res["rows"]:
        assert r["sdpa_us"] > 0
        for path in res["worst_overhead"]:
            c = r[path]
            assert c["paged_us"] > 0 and c["contiguous_us"] > 0
            # the ratio of the unrounded times; the us figures are rounded to 0.1
            assert abs(c["overhead"] * c["contiguous_us"] - c["paged_us"]) <= 0.1 * (1 + c["overhead"])
    assert res["arena"]["num_blocks"] == 3 * (5 + 1) and res["arena"]["layers_in_turn"] == [0, 1]
