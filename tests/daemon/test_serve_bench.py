"""kvmm bench serve on the tiny model: both sides run the same workload and report figures."""
import argparse

from kvmm_daemon.bench.serve_bench import Recorder, percentile, register_args, run_serve_bench


def test_percentile_nearest_rank():
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    values = list(range(1, 101))
    assert percentile(values, 50) == 50 and percentile(values, 99) == 99 and percentile(values, 100) == 100


def test_recorder_spreads_multi_token_chunks():
    rec = Recorder()
    rec.submitted("a")
    rec.delta("a", 1)
    rec.delta("a", 0)                       # empty chunks do not count
    rec.delta("a", 3)
    assert len(rec.ttft) == 1 and len(rec.itl) == 3 and rec.tokens == 4


def test_serve_bench_on_the_tiny_model(tiny_model, capsys):
    p = argparse.ArgumentParser()
    register_args(p)
    args = p.parse_args(["--model", str(tiny_model), "--clients", "3", "--requests", "6", "--max-tokens", "5",
                         "--kv-budget", "4MiB", "--threads", "1", "--rounds", "1", "--http"])
    result = run_serve_bench(args)
    (case,) = result["cases"]
    assert case["clients"] == 3
    for side in ("inprocess", "daemon", "http"):
        r = case[side]
        assert r["requests"] == 6 and r["completion_tokens"] == 30
        assert r["throughput_tok_s"] > 0 and r["ttft_p50_ms"] > 0 and r["itl_p99_ms"] >= r["itl_p50_ms"]
    assert case["overhead"]["throughput_ratio"] > 0
    assert case["http_vs_msgpack"]["throughput_ratio"] > 0
    assert case["daemon_engine_loop"]["steps"] >= 5      # at least the 5 tokens of the last request
    out = capsys.readouterr().out
    assert "daemon/in-process throughput" in out and "http/msgpack throughput" in out


def test_serve_bench_batch_one_is_a_default_case(tiny_model):
    p = argparse.ArgumentParser()
    register_args(p)
    args = p.parse_args(["--model", str(tiny_model), "--requests", "2", "--max-tokens", "3",
                         "--kv-budget", "4MiB", "--threads", "1", "--rounds", "1"])
    assert args.clients == [1, 8]
    result = run_serve_bench(argparse.Namespace(**{**vars(args), "clients": [1]}))
    (case,) = result["cases"]
    assert case["clients"] == 1 and case["daemon"]["completion_tokens"] == 6
    assert set(case["daemon_engine_loop"]) == {"steps", "busy_s", "admit_waits", "admit_wait_s", "admit_arrivals"}
    assert case["overhead"]["goal_met"] in (True, False)
