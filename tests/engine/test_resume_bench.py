"""`kvmm bench resume` end to end on the tiny model: the figures are there, the resume really
comes from flash, the pressure workload really preempts, and nothing is left behind."""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile

from kvmm_daemon.bench.resume_bench import register_args, run_resume_bench


def test_resume_bench_on_the_tiny_model(tiny_model, capsys):
    parent = tempfile.mkdtemp(prefix="kvmm-bench-test-", dir="/var/tmp")
    try:
        parser = argparse.ArgumentParser()
        register_args(parser)
        args = parser.parse_args(["--model", str(tiny_model), "--threads", "1", "--swap-dir", parent,
                                  "--swap-size", "32MiB", "--kv-budget", "4MiB", "--lengths", "16,64",
                                  "--repeats", "1", "--turn-tokens", "4", "--pressure-requests", "4",
                                  "--pressure-prompt", "32", "--pressure-tokens", "32",
                                  "--pressure-fit", "2", "--pressure-rounds", "1"])
        result = run_resume_bench(args)
        assert os.listdir(parent) == []                    # its swap spaces are removed
    finally:
        shutil.rmtree(parent, ignore_errors=True)
    assert set(result["resume_speedup"]) == {"16", "64"}
    assert all(v > 0 for v in result["resume_speedup"].values())
    assert result["resume_flash"]["session_tokens_from_flash"] >= 16 + 64
    assert result["resume_flash"]["errors"] == {}
    swap, recompute = result["pressure"]["swap"], result["pressure"]["recompute"]
    assert set(result["pressure_tokens_per_s"]) == {"swap", "recompute"}
    assert swap["preemptions"] > 0 and swap["swapped_in_tokens"] > 0 and swap["recomputed_tokens"] == 0
    assert recompute["preemptions"] > 0 and recompute["swapped_in_tokens"] == 0
    out = capsys.readouterr().out
    assert "from flash" in out and "recompute" in out and "speedup" in out
