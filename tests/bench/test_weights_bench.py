"""The parts of `kvmm bench weights`: memory cgroups that really limit, the plain O_DIRECT
reference, the kvmm child on a tiny model, the llama.cpp child (when llama_cpp is there)."""
import json
import os
import subprocess
import sys
import tempfile

import pytest

from kvmm_daemon.bench.direct_read import direct_read_bandwidth
from kvmm_daemon.bench.memory_cgroup import MemoryCgroup
from kvmm_daemon.bench.weights_bench import _budgets
from tests.bench.conftest import needs_cgroup, needs_llama_cpp

MiB = 1 << 20


ALLOC = "import sys; b = bytearray(int(sys.argv[1]) << 20); b[::4096] = b'x' * len(b[::4096]); print('ok')"


@needs_cgroup
def test_a_cgroup_limits_its_child_and_reports_the_oom_kill():
    with MemoryCgroup("kvmm-test-cg", 64 * MiB) as cg:
        small = cg.run([sys.executable, "-c", ALLOC, "8"], timeout=60)
        big = cg.run([sys.executable, "-c", ALLOC, "256"], timeout=60)
        path = cg.path
    assert small.returncode == 0 and small.stdout.strip() == "ok" and not small.oom_killed
    assert small.peak_bytes is None or small.peak_bytes <= 64 * MiB
    assert big.oom_killed and big.returncode != 0
    assert not path.exists()                              # removed on exit


@needs_cgroup
def test_a_leftover_group_of_a_killed_run_is_replaced():
    with MemoryCgroup("kvmm-test-cg2", 32 * MiB) as cg:
        leftover = cg.path
    leftover.mkdir()
    with MemoryCgroup("kvmm-test-cg2", 48 * MiB) as cg:
        assert cg.run([sys.executable, "-c", "print(1)"]).returncode == 0
    assert not leftover.exists()


def test_budget_labels():
    assert _budgets("100%,50%,22MiB", 1000 * MiB) == {"100%": 1000 * MiB, "50%": 500 * MiB, "22MiB": 22 * MiB}


def test_direct_read_reference_reads_the_file():
    with tempfile.NamedTemporaryFile(dir="/var/tmp") as f:
        f.write(os.urandom(8 * MiB))
        f.flush()
        assert direct_read_bandwidth(f.name, chunk=MiB, depth=2, repeats=1) > 0


def test_kvmm_child_reports_a_budgeted_run(tmp_path):
    from tests.model.tiny_gguf import write_tiny_gguf
    from tests.model.tiny_llama import write_tiny_llama

    hf = write_tiny_llama(tmp_path / "hf", layers=6, hidden=128, intermediate=256, vocab=320)
    model = str(write_tiny_gguf(tmp_path / "tiny.gguf", hf, weight_type="Q4_1"))
    state = tempfile.mkdtemp(dir="/var/tmp", prefix="kvmm-bench-test-")
    common = ["--batches", "1,4", "--tokens", "4", "--threads", "1", "--kv-budget", "4MiB",
              "--model", model, "--state-dir", state]
    try:
        runs = [json.loads(subprocess.run([sys.executable, "-m", "kvmm_daemon.bench.weights_run", *extra, *common],
                                          capture_output=True, text=True, check=True).stdout.splitlines()[-1])
                for extra in ([], ["--budget", "300000"])]
    finally:
        subprocess.run(["rm", "-rf", state])
    resident, streamed = runs
    assert streamed["greedy_token_ids"] == resident["greedy_token_ids"]
    assert streamed["pool"]["streaming"] and streamed["pool"]["arena_bytes"] <= 300000
    assert streamed["1"]["bytes_read_per_token"] >= streamed["pool"]["streamed_bytes_per_step"] > 0
    assert streamed["4"]["bytes_read_per_token"] < streamed["1"]["bytes_read_per_token"]   # one read per step
    assert 0 <= streamed["1"]["stall_share"] <= 1 and streamed["peak_rss"] > 0


@needs_llama_cpp
def test_llama_cpp_child_reports_its_own_memory_and_speed():
    from kvmm_daemon.model.model_file import default_model_path

    out = subprocess.run([sys.executable, "-m", "kvmm_daemon.bench.llama_cpp_limited", "--model",
                          str(default_model_path()), "--steps", "3", "--threads", "1"],
                         capture_output=True, text=True, check=True).stdout.splitlines()[-1]
    got = json.loads(out)
    assert got["anon_bytes"] > got["anon_before_model"] > 0
    assert got["decode_tokens_per_s"] > 0 and got["steps"] == 3 and got["load"] == "mmap"
