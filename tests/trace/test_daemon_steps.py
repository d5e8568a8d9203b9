"""The daemon's step trace in `kvmm trace`: a real daemon streaming the embedded model's weights
from flash (a 22 MiB pool) under load, traced with real probes.

The `steps` section must carry per-segment compute and I/O wait from the daemon, the block
probe must attribute the weight file's reads to it, and the timeline must draw the steps.
"""
import json
import shutil
import subprocess
import sys
import tempfile

import pytest

from kvmm_daemon.client import Client
from kvmm_daemon.trace.probes import detect_environment
from tests.trace.daemon_load import generating
from tests.daemon.conftest import DaemonProcess

pytestmark = [pytest.mark.slow, pytest.mark.bpf]


@pytest.fixture(scope="module")
def streaming_daemon():
    state = tempfile.mkdtemp(prefix="kvmm-state-", dir="/var/tmp")    # O_DIRECT needs a disk fs
    d = DaemonProcess(None, embedded=True, kv_budget="16MiB",
                      args=["--socket-group", "", "--weight-budget", "22MiB", "--state-dir", state,
                            "--max-model-len", "256"])
    yield d
    d.stop()
    d.cleanup()
    shutil.rmtree(state, ignore_errors=True)


def test_steps_op(streaming_daemon):
    with Client(streaming_daemon.socket) as c:
        c.generate(prompt="Hi", raw=True, max_tokens=3, ignore_eos=True)
        reply = c.steps()
    assert reply["available"] and reply["reason"] is None and reply["files"]["weights"].endswith(".kvw")
    assert reply["files"]["swap"] is None and reply["steps_total"] >= 3
    n = len(reply["segments"])
    assert n > 30 and len(reply["steps"]) >= 2
    for s in reply["steps"]:
        assert len(s["stall_s"]) == n and len(s["compute_s"]) == n and s["step_s"] > 0
        assert sum(s["stall_s"]) + sum(s["compute_s"]) <= s["step_s"] + 1e-3
        assert s["bytes_read"] > 0                   # most of the model streams every step


def test_trace_shows_steps_beside_the_weight_file(streaming_daemon, tmp_path):
    missing = detect_environment().missing()
    if missing:
        pytest.skip("BPF tracing unavailable: " + "; ".join(missing))
    timeline = tmp_path / "t.json"
    with generating(streaming_daemon.socket, max_tokens=8, timeout=60):
        proc = subprocess.run([sys.executable, "-m", "kvmm_daemon.cli", "trace", "--json", "-p",
                               str(streaming_daemon.proc.pid), "-i", "1.5", "-c", "2", "--perfetto", str(timeline),
                               "--probes", "block,syscalls"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    traced = [r for r in rows if r["steps"]["steps"]]
    assert traced, rows
    for r in traced:
        st = r["steps"]
        assert st["available"] and st["compute_ms"] > 0 and st["stall_ms"] >= 0 and st["bytes_read"] > 0
        assert len(st["records"]) == st["steps"] and st["steps"] + st["missed"] == st["steps_run"]
        assert sum(seg["compute_ms"] for seg in st["segments"]) == pytest.approx(st["compute_ms"], abs=0.01 * len(st["segments"]))
    weights = [r["block"]["files"]["weights"] for r in rows]
    assert weights[0]["path"].endswith(".kvw") and "swap" not in rows[0]["block"]["files"]
    # O_DIRECT reads of the weight file reach the device; most of the daemon's reads are its
    read_ios = sum(r["block"]["read"]["ios"] for r in rows)
    assert sum(w["ios"] for w in weights) >= 0.9 * read_ios > 0
    assert sum(w["latency_us"]["count"] for w in weights) == sum(w["ios"] for w in weights)
    events = json.loads(timeline.read_text())["traceEvents"]
    steps = [e for e in events if e["ph"] == "X" and e.get("cat") == "kvmm.step"]
    assert len(steps) == sum(r["steps"]["steps"] for r in rows)
    assert any(e.get("cat") == "kvmm.compute" for e in events)
