"""The OpenMP runtime a computing process chooses: the pure plan, then a real re-exec and a
real daemon reporting what serves its threads."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kvmm_daemon import openmp_runtime as omp
from kvmm_daemon.errors import KvmmError
from tests.daemon.conftest import ROOT

LLVM = omp.find_llvm_runtime()
needs_llvm = pytest.mark.skipif(LLVM is None, reason="LLVM's OpenMP runtime (libomp5) is not installed")


def test_plan_preloads_llvm_with_its_settings_and_remembers_the_users_preload():
    env, reason = omp.exec_plan({"LD_PRELOAD": "/x/mine.so", "KMP_BLOCKTIME": "5"}, 42, "/l/libomp.so.5")
    assert env["LD_PRELOAD"] == "/l/libomp.so.5 /x/mine.so"
    assert env[omp.EXEC_ENV] == "42:/x/mine.so"
    assert env["KMP_USE_YIELD"] == "0" and env["KMP_BLOCKTIME"] == "5"   # the user's value wins
    assert "LLVM libomp" in reason


def test_plan_never_execs_twice_in_one_process():
    env, reason = omp.exec_plan({omp.EXEC_ENV: "42:"}, 42, "/l/libomp.so.5")
    assert env is None and reason == omp.REEXECUTED
    # a child (another pid) that inherited the marker chooses for itself
    env, _ = omp.exec_plan({omp.EXEC_ENV: "42:"}, 43, "/l/libomp.so.5")
    assert env is not None and env[omp.EXEC_ENV] == "43:"


def test_plan_keeps_gnu_when_asked_or_when_llvm_is_absent():
    assert omp.exec_plan({"KVMM_OPENMP": "gnu"}, 1, "/l/libomp.so.5") == (None, "GNU libgomp (KVMM_OPENMP=gnu)")
    env, reason = omp.exec_plan({}, 1, None)
    assert env is None and "apt-get install libomp5" in reason
    with pytest.raises(KvmmError, match="KVMM_OPENMP=llvm but .* not installed"):
        omp.exec_plan({"KVMM_OPENMP": "llvm"}, 1, None)
    with pytest.raises(KvmmError, match="expected auto, llvm or gnu"):
        omp.exec_plan({"KVMM_OPENMP": "intel"}, 1, "/l/libomp.so.5")


def test_restore_preload_gives_children_the_users_environment():
    env = {omp.EXEC_ENV: "7:/x/mine.so", "LD_PRELOAD": "/l/libomp.so.5 /x/mine.so"}
    omp.restore_preload(env)
    assert env == {"LD_PRELOAD": "/x/mine.so"}
    env = {omp.EXEC_ENV: "7:", "LD_PRELOAD": "/l/libomp.so.5"}
    omp.restore_preload(env)
    assert env == {}


def test_loaded_runtimes_reads_the_maps(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/llvm-14/lib/libomp.so.5\n"
                    "7f02-7f03 r-xp 0 08:01 2 /venv/torch/lib/libgomp.so.1\n"
                    "7f04-7f05 rw-p 0 00:00 0 [heap]\n")
    assert omp.loaded_runtimes(str(maps)) == {"llvm", "gnu"}
    assert omp.loaded_runtimes(str(tmp_path / "absent")) == set()


PROBE = ("import json, os\n"
         "from kvmm_daemon import openmp_runtime as o\n"
         "reason = o.ensure()\n"
         "import torch\n"
         "torch.set_num_threads(2); torch.ones(1 << 20).sum()\n"
         "print(json.dumps({'pid': os.getpid(), 'reason': reason, 'runtime': o.describe(),\n"
         "                  'preload': os.environ.get('LD_PRELOAD'), 'marker': os.environ.get(o.EXEC_ENV)}))\n")


def run_probe(**env_extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KVMM_", "KMP_")) and k != "LD_PRELOAD"}
    env.update(PYTHONPATH=str(ROOT), **env_extra)
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_llvm
def test_a_real_process_reexecs_once_into_llvm_and_hides_the_preload_from_children():
    got = run_probe()
    assert got["runtime"] == "llvm" and got["reason"].startswith("LLVM libomp"), got
    assert got["preload"] is None and got["marker"] is None      # children start clean


def test_a_real_process_keeps_gnu_when_told():
    got = run_probe(KVMM_OPENMP="gnu")
    assert got["runtime"] == "gnu" and got["reason"] == "GNU libgomp (KVMM_OPENMP=gnu)", got


@needs_llvm
def test_the_daemon_reports_the_runtime_serving_its_threads(daemon):
    from kvmm_daemon.client import Client

    with Client(daemon.socket) as c:
        stats = c.stats()
    assert stats["openmp"]["runtime"] == "llvm", stats["openmp"]
    with open(f"/proc/{daemon.proc.pid}/maps") as f:     # re-exec kept the pid systemd and the tests know
        assert "libomp" in f.read()
    assert "OpenMP runtime: LLVM libomp" in daemon.log()
