"""`kvmm trace` through the CLI entry point: arguments, errors, and a /proc run of a command."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from kvmm_daemon import cli
from kvmm_daemon.trace import target

CHILD = """
import os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
end = time.monotonic() + float(sys.argv[2])
n = 0
while time.monotonic() < end:
    os.pread(fd, 4096, 0)
    n += 1
    time.sleep(0.001)
print(n, file=sys.stderr)
sys.exit(3)
"""


def test_ebpf_prints_the_program_without_running(capsys):
    assert cli.main(["trace", "--ebpf", "--probes", "syscalls"]) == 0
    out = capsys.readouterr().out
    assert "TRACEPOINT_PROBE(raw_syscalls, sys_enter)" in out and "sched_process_fork" not in out
    assert cli.main(["trace", "--ebpf", "--children"]) == 0
    out = capsys.readouterr().out
    assert "TRACEPOINT_PROBE(sched, sched_process_fork)" in out and "TRACEPOINT_PROBE(block, block_rq_issue)" in out


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit):
        cli.main(["trace", "--help"])
    out = capsys.readouterr().out
    assert "examples:" in out and "kvmm trace --perfetto t.json -- kvmm run" in out and "--ebpf" not in out


@pytest.mark.parametrize("argv, message", [
    (["-p", "1", "--", "true"], "give either --pid or a command after --, not both"),
    (["-i", "0", "--", "true"], "--interval 0.0 is not positive"),
    (["-c", "0", "--", "true"], "--count 0 is below 1"),
    (["--probes", "block,kprobe", "--", "true"], "--probes: unknown probe kprobe; choose from block"),
    (["-p", "999999999"], "no process with pid 999999999"),
])
def test_argument_errors(capsys, argv, message):
    assert cli.main(["trace", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvmm: error: ") and message in err and err.count("\n") == 1


def test_no_daemon_running(capsys):
    if not target.find_daemons():
        assert cli.main(["trace", "--procfs", "-c", "1"]) == 2
        err = capsys.readouterr().err
    else:
        # daemons of other tests are running: look from a fresh pid namespace, where none is
        if os.geteuid() != 0 or shutil.which("unshare") is None:
            pytest.skip("a kvmm daemon is running here, and a fresh pid namespace needs root and unshare")
        p = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m",
                            "kvmm_daemon.cli", "trace", "--procfs", "-c", "1"],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 2, p.stderr
        err = p.stderr
    assert "no kvmm daemon is running (no process runs `kvmm serve`)" in err


def test_procfs_run_of_a_command(tmp_path, capfd):
    data = tmp_path / "data"
    data.write_bytes(b"x" * 4096)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    timeline = tmp_path / "t.json"
    rc = cli.main(["trace", "--procfs", "--json", "-i", "0.3", "--perfetto", str(timeline), "--",
                   sys.executable, str(script), str(data), "0.5"])
    assert rc == 3   # the command's exit status
    captured = capfd.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    reads = int(next(line for line in captured.err.splitlines() if line.isdigit()))
    assert len(rows) >= 2 and all(r["source"] == "procfs" for r in rows)
    assert rows[0]["notes"] == ["--procfs: BPF not used; /proc counters only"]
    assert reads > 100
    syscr = sum(r["process"]["syscr"] for r in rows)
    assert reads <= syscr <= reads + 300   # the command's interpreter reads its own files too
    assert sum(r["interval_s"] for r in rows) == pytest.approx(rows[-1]["t_s"], abs=1e-5)
    trace = json.loads(timeline.read_text())
    assert any(e["name"] == "read/write syscalls/s" for e in trace["traceEvents"])
    assert "kvmm trace: tracing pid" in captured.err and "with /proc counters; until it exits" in captured.err
