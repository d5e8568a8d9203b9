import os
import subprocess
import sys
import time

import pytest

from kvmm_daemon.trace import procfs

STAT = ("4242 (kvmm (serve) x) S 1 4242 4242 0 -1 4194560 {minflt} 0 {majflt} 0 {utime} {stime} 0 0 20 0 "
        "{threads} 0 123 1000 200 18446744073709551615 1 1 0 0 0 0 0 16781312 0 0 0 0 17 1 0 0 {blkio} 0 0")


def stat_text(minflt=100, majflt=2, utime=50, stime=25, threads=3, blkio=7):
    return STAT.format(minflt=minflt, majflt=majflt, utime=utime, stime=stime, threads=threads, blkio=blkio)


def test_parse_stat_with_parentheses_in_comm():
    s = procfs.parse_stat(stat_text())
    assert s == {"minflt": 100, "majflt": 2, "utime_ticks": 50, "stime_ticks": 25, "num_threads": 3,
                 "blkio_ticks": 7}


def test_parse_small_files():
    assert procfs.parse_io("rchar: 10\nwchar: 20\nsyscr: 3\nsyscw: 4\nread_bytes: 4096\nwrite_bytes: 0\n"
                           "cancelled_write_bytes: 0\n") == {"rchar": 10, "wchar": 20, "syscr": 3, "syscw": 4,
                                                            "read_bytes": 4096, "write_bytes": 0}
    assert procfs.parse_schedstat("1000 2000 3\n") == {"run_ns": 1000, "runqueue_wait_ns": 2000}
    status = "Name:\tx\nvoluntary_ctxt_switches:\t5\nnonvoluntary_ctxt_switches:\t6\n"
    assert procfs.parse_status_switches(status) == {"voluntary_ctxt_switches": 5, "nonvoluntary_ctxt_switches": 6}
    assert procfs.parse_vmstat("nr_free_pages 1\npgfault 10\npgmajfault 2\npswpin 0\n") == \
        {"pgfault": 10, "pgmajfault": 2, "pswpin": 0}


def test_sample_delta_converts_units():
    a = procfs.ProcSample(7, {"utime_ticks": 10, "run_ns": 5_000_000, "syscr": 3, "num_threads": 2,
                              "voluntary_ctxt_switches": 10}, {"pgfault": 100})
    b = procfs.ProcSample(7, {"utime_ticks": 10 + procfs.CLK_TCK, "run_ns": 7_500_000, "syscr": 9, "num_threads": 4,
                              "voluntary_ctxt_switches": 8, "rchar": 5}, {"pgfault": 150})
    d = procfs.sample_delta(a, b)
    assert d["process"] == {"utime_ms": 1000.0, "run_ms": 2.5, "syscr": 6, "threads": 4,
                            "voluntary_ctxt_switches": 0}   # per-thread sums clamp at 0; rchar read once only
    assert d["system"] == {"pgfault": 50}
    with pytest.raises(ValueError):
        procfs.sample_delta(a, procfs.ProcSample(8, {}, {}))


READER = """
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
sys.stdin.readline()
for _ in range(200):
    os.pread(fd, 4096, 0)
sys.stdout.write("done\\n"); sys.stdout.flush()
sys.stdin.readline()
"""


def test_read_sample_of_a_real_process(tmp_path):
    data = tmp_path / "data"
    data.write_bytes(os.urandom(8192))
    child = subprocess.Popen([sys.executable, "-c", READER, str(data)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.3)
        before = procfs.read_sample(child.pid)
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline() == "done\n"
        after = procfs.read_sample(child.pid)
        d = procfs.sample_delta(before, after)["process"]
        assert d["syscr"] >= 200 and d["rchar"] >= 200 * 4096
        assert d["threads"] == 1
        assert {"minflt", "utime_ms", "stime_ms", "voluntary_ctxt_switches", "run_ms"} <= set(d)
        assert "pgfault" in after.system
    finally:
        child.stdin.close()
        child.wait()
    with pytest.raises(ProcessLookupError):
        procfs.read_sample(child.pid)
