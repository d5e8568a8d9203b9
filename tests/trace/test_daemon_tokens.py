"""Figures per token: `kvmm trace -p PID` on a real daemon serving a tiny model.

Runs with BPF where the machine allows it and with /proc counters otherwise; either way the
daemon's tokens per interval must show up and divide the figures.
"""
import json
import subprocess
import sys

import pytest

from tests.trace.daemon_load import generating
from tests.daemon.conftest import DaemonProcess, _load_tiny_llama


@pytest.fixture(scope="module")
def tiny_daemon(tmp_path_factory):
    model = _load_tiny_llama()(tmp_path_factory.mktemp("tiny-llama"), context=512)
    d = DaemonProcess(model, args=["--socket-group", ""])
    yield d
    d.stop()
    d.cleanup()


def test_tokens_per_interval(tiny_daemon):
    with generating(tiny_daemon.socket, max_tokens=16, timeout=30):
        proc = subprocess.run([sys.executable, "-m", "kvmm_daemon.cli", "trace", "--json", "-p",
                               str(tiny_daemon.proc.pid), "-i", "0.5", "-c", "3"],  # socket: from its cmdline
                              capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(rows) == 3
    busy = [r for r in rows if r["tokens"]]
    assert busy, f"no tokens seen: {rows}"
    for r in busy:
        assert r["per_token"]
        if r["source"] == "bpf":
            assert r["per_token"]["syscalls"] == round(r["syscalls"]["count"] / r["tokens"], 3)
        else:
            assert r["per_token"]["cpu_ms"] > 0
    assert "per-token figures omitted" not in proc.stderr
