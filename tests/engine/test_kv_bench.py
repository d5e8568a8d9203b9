"""`kvmm bench kv` runs its workload on the real KV manager and reports every key."""
from __future__ import annotations

import argparse

from kvmm_daemon.bench.kv_bench import register_args, run_kv_bench


def test_kv_bench_figures():
    p = argparse.ArgumentParser()
    register_args(p)
    res = run_kv_bench(p.parse_args(["--requests", "60", "--budget-tokens", "16384"]))
    assert 0.9 < res["kv_slot_utilization"] <= 1.0
    assert res["concurrency_vs_contiguous"] > 1.0
    assert 0 < res["parallel_sampling_kv_saving"] < 1 and 0 < res["beam_search_kv_saving"] < 1
    c = res["concurrency_baselines"]
    # the vLLM paper's ordering: the less a contiguous allocator must guess, the more fit
    assert c["max_len"] <= c["prompt_plus_max_tokens_pow2"] <= c["prompt_plus_max_tokens"] <= c["oracle"]
    assert res["paged_mean_concurrency"] >= c["oracle"] * 0.95
    assert all(0 < u <= 1 for u in res["pool_utilization"].values())
    assert len(res["pool_utilization_over_time"]["paged"]) == 20
