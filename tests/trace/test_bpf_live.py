"""The real probes on a real process: `kvmm trace` runs a child doing O_DIRECT reads and syscalls.

Needs root, bcc, kernel headers and tracefs; skips with the exact reason otherwise. One
traced run (one BPF compile) serves the module's checks.
"""
import json
import os
import subprocess
import sys
import time

import pytest

from kvmm_daemon.trace.probes import detect_environment

pytestmark = pytest.mark.bpf

CHILD = r"""
import json, mmap, os, sys, time
path, secs = sys.argv[1], float(sys.argv[2])
try:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
except OSError as exc:
    print(json.dumps({"error": f"O_DIRECT open failed: {exc}"}), file=sys.stderr)
    sys.exit(0)
buf = mmap.mmap(-1, 4096)          # page-aligned, as O_DIRECT wants
blocks = os.fstat(fd).st_size // 4096
n = 0
end = time.monotonic() + secs
while time.monotonic() < end:
    os.preadv(fd, [buf], (n * 7919 % blocks) * 4096)
    os.getppid()
    n += 1
print(json.dumps({"reads": n}), file=sys.stderr)
"""


def require_bpf() -> None:
    missing = detect_environment().missing()
    if missing:
        pytest.skip("BPF tracing unavailable: " + "; ".join(missing))


def kvmm_trace(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvmm_daemon.cli", "trace", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    require_bpf()
    d = tmp_path_factory.mktemp("bpf")
    data, script, timeline = d / "data", d / "child.py", d / "timeline.json"
    with open(data, "wb") as f:
        f.write(os.urandom(8 << 20))
        os.fsync(f.fileno())
    script.write_text(CHILD)
    t0 = time.monotonic()
    proc = kvmm_trace("--json", "-i", "0.5", "--perfetto", str(timeline), "--", sys.executable, str(script),
                      str(data), "1.5")
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    child = json.loads(next(line for line in proc.stderr.splitlines() if line.startswith("{")))
    if "error" in child:
        pytest.skip(f"{child['error']} ({d} is on a file system without O_DIRECT)")
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    return {"rows": rows, "reads": child["reads"], "stderr": proc.stderr, "timeline": timeline, "elapsed": elapsed}


def total(rows, *path):
    out = 0
    for r in rows:
        v = r
        for p in path:
            v = v[p]
        out += v
    return out


def syscall_count(rows, name):
    return sum(s["count"] for r in rows for s in r["syscalls"]["by_syscall"] if s["name"] == name)


def test_all_probes_compile_and_attach(traced):
    rows = traced["rows"]
    assert rows and all(r["source"] == "bpf" for r in rows)
    assert "does not compile" not in traced["stderr"] and "unavailable" not in traced["stderr"]
    assert {"syscalls", "block", "offcpu", "faults"} <= set(rows[0])
    assert traced["elapsed"] < 30


def test_syscalls_counted_exactly(traced):
    rows, n = traced["rows"], traced["reads"]
    assert n >= 200, "the child did too few reads to judge"
    assert syscall_count(rows, "preadv2") == n   # none lost: the maps are cumulative
    assert syscall_count(rows, "getppid") == n
    assert total(rows, "syscalls", "time_ms") > 0


def test_block_reads_and_latency(traced):
    rows, n = traced["rows"], traced["reads"]
    ios = total(rows, "block", "read", "ios")
    assert 0.9 * n <= ios <= n + 50               # each O_DIRECT read is one request to the device
    assert total(rows, "block", "read", "bytes") >= 0.9 * n * 4096
    assert sum(r["block"]["read"]["latency_us"]["count"] for r in rows) == ios
    assert total(rows, "block", "read", "time_ms") > 0


def test_offcpu_io_wait_and_faults(traced):
    rows, n = traced["rows"], traced["reads"]
    assert total(rows, "offcpu", "io", "count") >= 0.5 * n   # the reader sleeps in D for its reads
    assert total(rows, "offcpu", "io", "time_ms") > 0
    assert total(rows, "faults", "user") > 0


def test_timeline(traced):
    trace = json.loads(traced["timeline"].read_text())
    counters = [e for e in trace["traceEvents"] if e["ph"] == "C" and e["name"] == "block ios/s"]
    assert len(counters) == len(traced["rows"]) + 1 and max(c["args"]["read"] for c in counters) > 0


def test_trace_by_pid(tmp_path):
    require_bpf()
    sleeper = subprocess.Popen([sys.executable, "-c",
                                "import os, time\nend = time.monotonic() + 20\n"
                                "while time.monotonic() < end:\n    os.getppid(); time.sleep(0.001)"])
    try:
        proc = kvmm_trace("--json", "-p", str(sleeper.pid), "-i", "0.3", "-c", "2", "--probes", "syscalls,offcpu")
    finally:
        sleeper.kill()
        sleeper.wait()
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(rows) == 2 and set(rows[0]) >= {"syscalls", "offcpu"} and "block" not in rows[0]
    assert all(syscall_count([r], "getppid") > 50 for r in rows)
    assert all(r["offcpu"]["sleep"]["count"] > 50 for r in rows)   # time.sleep: S state


def test_children_of_a_command_are_traced():
    require_bpf()
    grandchild = "import os\nfor _ in range(1000): os.getppid()"
    proc = kvmm_trace("--json", "--probes", "syscalls", "--", "sh", "-c", f"{sys.executable} -c '{grandchild}'")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert syscall_count(rows, "getppid") >= 1000   # made by sh's child, found through sched_process_fork
    assert syscall_count(rows, "wait4") >= 1        # sh waiting for it


URING_NOPS = r"""
import ctypes, ctypes.util, sys
lib = ctypes.CDLL(ctypes.util.find_library("uring") or "liburing.so.2")
lib.io_uring_get_sqe.restype = ctypes.c_void_p
ring = ctypes.create_string_buffer(4096)           # larger than struct io_uring
rc = lib.io_uring_queue_init(256, ring, 0)         # CQ of 512: the 200 completions are never reaped
if rc < 0:
    sys.exit(f"io_uring_queue_init failed: errno {-rc}")
for done in range(0, 200, 40):
    for i in range(40):
        sqe = lib.io_uring_get_sqe(ring)
        ctypes.memset(sqe, 0, 64)                  # opcode 0 = IORING_OP_NOP
        ctypes.c_uint64.from_address(sqe + 32).value = done + i   # user_data
    assert lib.io_uring_submit_and_wait(ring, 40) == 40
"""


def test_io_uring_submissions(tmp_path):
    require_bpf()
    import ctypes.util
    if ctypes.util.find_library("uring") is None:
        pytest.skip("liburing is not installed (apt install liburing2)")
    script = tmp_path / "nops.py"
    script.write_text(URING_NOPS)
    proc = kvmm_trace("--json", "--probes", "io_uring", "--", sys.executable, str(script))
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert "io_uring" in rows[0], proc.stderr
    assert total(rows, "io_uring", "submitted") == 200 and total(rows, "io_uring", "completed") == 200
    nops = [op for r in rows for op in r["io_uring"]["by_op"]]
    assert {op["name"] for op in nops} == {"NOP"} and sum(op["count"] for op in nops) == 200


def test_a_probe_that_does_not_compile_is_dropped(monkeypatch):
    require_bpf()
    from kvmm_daemon.trace import bpf_text
    from kvmm_daemon.trace.probes import BpfSession, Selection

    monkeypatch.setitem(bpf_text.FRAGMENTS, "faults", bpf_text.FAULTS.replace("add_total(T_FAULTS_USER, 1);",
                                                                                "undeclared_counter += 1;"))
    session = BpfSession.open(Selection(("syscalls", "faults"), bio_queue=False, follow_children=False))
    try:
        assert session.selection.enabled == ("syscalls",)
        assert len(session.notes) == 1 and session.notes[0].startswith("faults: BPF program does not compile (")
        assert "undeclared_counter" in session.notes[0]
        session.add_target(os.getpid())
        before = session.read()
        os.getppid()
        delta = session.read().minus(before)
        assert delta.syscalls[110][0] >= 1   # getppid, x86_64 nr 110 (this test runs where BPF does)
    finally:
        session.close()


def _session(probes):
    from kvmm_daemon.trace.probes import BpfSession, select_probes, tracepoint_exists
    env = detect_environment()
    return BpfSession.open(select_probes(probes, lambda tp: tracepoint_exists(env.tracefs, tp)))


def test_futex_waits_and_wakes_counted_exactly():
    require_bpf()
    import ctypes
    from kvmm_daemon.trace.names import syscall_nr

    libc = ctypes.CDLL(None, use_errno=True)
    word = ctypes.c_int(0)
    futex = lambda op, val: libc.syscall(syscall_nr("futex"), ctypes.byref(word), op, val, None, None, 0)
    session = _session(["syscalls"])
    try:
        session.add_target(os.getpid())
        before = session.read()
        for _ in range(300):
            assert futex(1 | 128, 1) == 0          # FUTEX_WAKE_PRIVATE: nobody waits, 0 woken
        for _ in range(200):
            assert futex(0 | 128, 1) == -1         # FUTEX_WAIT_PRIVATE on 0 != 1: EAGAIN at once
        d = session.read().minus(before)
    finally:
        session.close()
    # this process's other threads (if any) may add a few of their own
    assert 300 <= d.total("futex_wakes") <= 320 and d.total("futex_woken") <= 20
    assert 200 <= d.total("futex_waits") <= 220


def test_block_requests_attributed_to_files():
    require_bpf()
    import mmap
    import tempfile
    from kvmm_daemon.trace.file_extents import file_extents

    d = tempfile.mkdtemp(prefix="kvmm-trace-files-", dir="/var/tmp")   # a disk file system (not tmpfs)
    paths = [os.path.join(d, n) for n in ("weights", "swap", "other")]
    try:
        for p in paths:
            with open(p, "wb") as f:
                f.write(os.urandom(4 << 20))
                os.fsync(f.fileno())
        try:
            file_extents(paths[0])
        except ValueError as exc:
            pytest.skip(f"cannot map files to sectors here: {exc}")
        session = _session(["block"])
        try:
            assert session.set_files({"weights": paths[0], "swap": paths[1]}) == []
            assert session.files == {"weights": paths[0], "swap": paths[1]}
            session.add_target(os.getpid())
            before = session.read()
            buf = mmap.mmap(-1, 4096)
            for p, n in zip(paths, (200, 100, 150)):
                fd = os.open(p, os.O_RDONLY | os.O_DIRECT)
                try:
                    for i in range(n):
                        os.preadv(fd, [buf], (i * 7 % 1024) * 4096)
                finally:
                    os.close(fd)
            delta = session.read().minus(before)
        finally:
            session.close()
    finally:
        for p in paths:
            os.unlink(p)
        os.rmdir(d)
    assert 180 <= delta.total("file_weights_ios") <= 200 and 90 <= delta.total("file_swap_ios") <= 100
    assert delta.total("file_weights_bytes") == 4096 * delta.total("file_weights_ios")
    assert delta.total("block_read_ios") >= 0.9 * 450     # the third file's reads: block only
    assert sum(delta.hist("file_weights").values()) == delta.total("file_weights_ios")
