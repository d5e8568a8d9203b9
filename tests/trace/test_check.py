"""`kvmm trace --check` on this machine (real probes attached) and without privileges."""
import shutil
import subprocess
import sys

import pytest

from kvmm_daemon.trace import check
from kvmm_daemon.trace.probes import detect_environment
from kvmm_daemon.trace.programs import PROBES


def kvmm(*args, prefix=()):
    return subprocess.run([*prefix, sys.executable, "-m", "kvmm_daemon.cli", "trace", *args],
                          capture_output=True, text=True, timeout=120)


def test_line_names_reasons():
    notes = ["fuse: tracepoint fuse:fuse_request_send missing; FUSE requests sent and served, per opcode not traced",
             "block: tracepoint block:block_bio_queue missing; only requests the target issues itself are counted",
             "io_uring: BPF program does not compile (unknown type); not traced"]
    reasons = check.reasons_from_notes(notes, ["fuse", "io_uring"])
    assert reasons == {"fuse": "tracepoint fuse:fuse_request_send missing",
                       "io_uring": "BPF program does not compile (unknown type)"}
    assert check.format_line(["block", "syscalls"], reasons) == (
        "kvmm trace --check: attach: block, syscalls | cannot: fuse (tracepoint fuse:fuse_request_send "
        "missing); io_uring (BPF program does not compile (unknown type))")
    assert check.format_line((), {}, ["not root"]) == "kvmm trace --check: no probe can attach: not root"


@pytest.mark.bpf
def test_check_attaches_here():
    missing = detect_environment().missing()
    if missing:
        pytest.skip("BPF tracing unavailable: " + "; ".join(missing))
    proc = kvmm("--check")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvmm trace --check: attach: ")
    attached = lines[0].split("attach: ")[1].split(" | ")[0].split(", ")
    assert {"block", "syscalls", "offcpu", "faults"} <= set(attached)
    assert all(p in lines[0] for p in PROBES)        # each probe is either attached or has a reason


@pytest.mark.bpf
def test_check_without_privileges():
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    proc = kvmm("--check", prefix=("setpriv", "--inh-caps=-all", "--bounding-set=-all"))
    assert proc.returncode == 1
    assert proc.stdout.startswith("kvmm trace --check: no probe can attach: no BPF privileges")
    assert len(proc.stdout.splitlines()) == 1
