import json

from kvmm_daemon.trace import report
from kvmm_daemon.trace.counters import BpfCounters
from kvmm_daemon.trace.programs import PROBES

DELTA = BpfCounters(
    totals={"block_read_ios": 100, "block_read_bytes": 409600, "block_read_ns": 2_000_000,
            "offcpu_io_count": 90, "offcpu_io_ns": 3_000_000, "offcpu_sleep_count": 10, "offcpu_sleep_ns": 7_000_000,
            "faults_user": 40, "faults_write": 10, "io_uring_submitted": 3, "io_uring_completed": 3},
    hists={"block_read": {5: 60, 6: 40}, "offcpu_io": {5: 90}, "offcpu_sleep": {10: 10}},
    syscalls={17: (100, 2_500_000, 0), 202: (300, 1_000_000, 2), 0: (300, 10_000, 0)},
    fuse={(15, "served"): (4, 40_000, 1)}, io_uring={22: (3, 30_000, 0)})


def sections(enabled=tuple(PROBES)):
    return report.bpf_sections(DELTA, enabled)


def test_bpf_sections():
    s = sections()
    assert s["syscalls"]["count"] == 700 and s["syscalls"]["errors"] == 2 and s["syscalls"]["time_ms"] == 3.51
    assert [r["name"] for r in s["syscalls"]["by_syscall"]] == ["futex", "read", "pread64"]  # by count, then time
    assert s["block"]["read"] == {"ios": 100, "bytes": 409600, "time_ms": 2.0,
                                  "latency_us": {"count": 100, "p50_le": 31, "p99_le": 63,
                                                 "buckets": [{"lo": 16, "hi": 31, "count": 60},
                                                             {"lo": 32, "hi": 63, "count": 40}]}}
    assert s["block"]["write"]["ios"] == 0 and s["block"]["write"]["latency_us"]["count"] == 0
    o = s["offcpu"]
    assert o["switches"] == 100 and o["time_ms"] == 10.0 and o["io"]["time_ms"] == 3.0 and o["preempted"]["count"] == 0
    assert s["faults"] == {"user": 40, "write": 10}
    assert s["fuse"] == {"sent": [], "served": [{"name": "READ", "nr": 15, "count": 4, "time_us": 40.0, "errors": 1}]}
    assert s["io_uring"]["submitted"] == 3 and s["io_uring"]["by_op"][0]["name"] == "READ"
    assert set(sections(["faults"])) == {"faults"}


def test_per_token_and_interval_dict():
    d = report.build_interval(index=1, t_s=1.0, interval_s=1.0, source="bpf", pids=[9, 3], sections=sections(),
                              tokens=50, notes=["n1"], now=1700000000.0)
    assert d["pids"] == [3, 9] and d["notes"] == ["n1"] and d["tokens"] == 50
    assert d["per_token"] == {"syscalls": 14.0, "faults": 0.8, "transitions": 14.8, "block_read_bytes": 8192.0,
                              "block_ms": 0.04, "offcpu_ms": 0.2, "io_wait_ms": 0.06}
    json.dumps(d)
    no_tokens = report.build_interval(index=1, t_s=1, interval_s=1, source="bpf", pids=[1], sections={},
                                      tokens=None)
    assert "per_token" not in no_tokens and "notes" not in no_tokens


def test_table_shows_every_section():
    d = report.build_interval(index=1, t_s=1.0, interval_s=1.0, source="bpf", pids=[3], sections=sections(),
                              tokens=50)
    text = report.format_interval(d, top=2)
    assert "syscalls      700  (in kernel 3.5 ms, errors 2)" in text
    assert "    futex" in text and "    read " in text and "pread64" not in text and "... 1 more" in text
    assert "block I/O     read 100 ios 400.0 KiB (mean 20 us)  write 0 ios 0 B" in text
    assert "read usecs : count" in text and "32 -> 63" in text
    assert "off-CPU       100 switches  10.0 ms  (io wait/D 3.0 ms, sleep 7.0 ms, preempted 0.0 ms)" in text
    assert "page faults   user 40 (write 10)" in text
    assert "fuse          sent 0  served 4" in text
    assert "per token     syscalls 14" in text
    assert "usecs" not in report.format_interval(d, hists=False)


def test_table_of_procfs_interval():
    sec = {"process": {"read_bytes": 2 << 20, "rchar": 5, "syscr": 7, "utime_ms": 10.0, "stime_ms": 5.0,
                       "minflt": 3, "majflt": 0, "voluntary_ctxt_switches": 4, "threads": 2},
           "system": {"pgfault": 9}}
    d = report.build_interval(index=2, t_s=2, interval_s=1, source="procfs", pids=[5], sections=sec, tokens=3)
    text = report.format_interval(d)
    assert "read 2.0 MiB from disk" in text and "syscr 7" in text and "page faults   minor 3  major 0" in text
    assert "system        pgfault 9" in text
    assert d["per_token"]["cpu_ms"] == 5.0 and d["per_token"]["syscr"] == round(7 / 3, 3)
