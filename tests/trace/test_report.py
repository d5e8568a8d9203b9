import json

from kvmm_daemon.trace import report
from kvmm_daemon.trace.counters import BpfCounters
from kvmm_daemon.trace.programs import PROBES

DELTA = BpfCounters(
    totals={"block_read_ios": 100, "block_read_bytes": 409600, "block_read_ns": 2_000_000,
            "offcpu_io_count": 90, "offcpu_io_ns": 3_000_000, "offcpu_sleep_count": 10, "offcpu_sleep_ns": 7_000_000,
            "faults_user": 40, "faults_write": 10, "io_uring_submitted": 3, "io_uring_completed": 3,
            "futex_waits": 50, "futex_wakes": 150, "futex_woken": 40,
            "file_weights_ios": 60, "file_weights_bytes": 245760, "file_weights_ns": 1_200_000},
    hists={"block_read": {5: 60, 6: 40}, "offcpu_io": {5: 90}, "offcpu_sleep": {10: 10}, "file_weights": {5: 60}},
    syscalls={17: (100, 2_500_000, 0), 202: (300, 1_000_000, 2), 0: (300, 10_000, 0)},
    fuse={(15, "served"): (4, 40_000, 1)}, io_uring={22: (3, 30_000, 0)})


FILES = {"weights": "/var/lib/kvmm/w.kvmw", "swap": "/var/lib/kvmm/swap/kvmm-swap.slots"}


def sections(enabled=tuple(PROBES), files=None):
    return report.bpf_sections(DELTA, enabled, files)


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
    assert s["syscalls"]["futex"] == {"waits": 50, "wakes": 150, "woken": 40}
    assert set(sections(["faults"])) == {"faults"}
    assert "files" not in s["block"]


def test_block_of_the_daemon_files():
    files = sections(files=FILES)["block"]["files"]
    assert list(files) == ["weights", "swap"]
    assert files["weights"] == {"path": FILES["weights"], "ios": 60, "bytes": 245760, "time_ms": 1.2,
                                "latency_us": {"count": 60, "p50_le": 31, "p99_le": 31,
                                               "buckets": [{"lo": 16, "hi": 31, "count": 60}]}}
    assert files["swap"]["ios"] == 0 and files["swap"]["latency_us"]["count"] == 0
    assert "files" not in sections(["block"], files={})["block"]


def test_per_token_and_interval_dict():
    d = report.build_interval(index=1, t_s=1.0, interval_s=1.0, source="bpf", pids=[9, 3], sections=sections(),
                              tokens=50, notes=["n1"], now=1700000000.0)
    assert d["pids"] == [3, 9] and d["notes"] == ["n1"] and d["tokens"] == 50
    assert d["per_token"] == {"syscalls": 14.0, "futex_wakes": 3.0, "futex_woken": 0.8, "switches": 2.0,
                              "faults": 0.8, "transitions": 14.8, "block_read_bytes": 8192.0,
                              "block_ms": 0.04, "offcpu_ms": 0.2, "io_wait_ms": 0.06,
                              "by_syscall": {"futex": 6.0, "read": 6.0, "pread64": 2.0}}
    json.dumps(d)
    no_tokens = report.build_interval(index=1, t_s=1, interval_s=1, source="bpf", pids=[1], sections={},
                                      tokens=None)
    assert "per_token" not in no_tokens and "notes" not in no_tokens


def test_table_shows_every_section():
    d = report.build_interval(index=1, t_s=1.0, interval_s=1.0, source="bpf", pids=[3], sections=sections(),
                              tokens=50)
    text = report.format_interval(d, top=2)
    assert "syscalls      700  (in kernel 3.5 ms, errors 2; futex waits 50, wakes 150 waking 40 threads)" in text
    assert "    futex" in text and "    read " in text and "pread64" not in text and "... 1 more" in text
    assert "block I/O     read 100 ios 400.0 KiB (mean 20 us)  write 0 ios 0 B" in text
    assert "read usecs : count" in text and "32 -> 63" in text
    assert "off-CPU       100 switches  10.0 ms  (io wait/D 3.0 ms, sleep 7.0 ms, preempted 0.0 ms)" in text
    assert "page faults   user 40 (write 10)" in text
    assert "fuse          sent 0  served 4" in text
    assert "  per token     syscalls 14  futex_wakes 3  futex_woken 0.8  switches 2  faults 0.8" in text
    assert "    by syscall  futex 6  read 6" in text and "pread64 2" not in text      # top 2
    assert "usecs" not in report.format_interval(d, hists=False)


def test_table_of_files_and_steps():
    st = {"available": True, "reason": None, "steps": 2, "steps_run": 3, "missed": 1, "step_ms": 10.0,
          "compute_ms": 6.0, "stall_ms": 3.5, "bytes_read": 2 << 20,
          "segments": [{"name": "layer.0", "compute_ms": 2.0, "stall_ms": 0.5},
                       {"name": "layer.1", "compute_ms": 4.0, "stall_ms": 3.0}], "records": []}
    d = report.build_interval(index=1, t_s=1.0, interval_s=1.0, source="bpf", pids=[3],
                              sections=sections(files=FILES), tokens=2, steps=st)
    text = report.format_interval(d, top=5)
    assert f"    weights file  60 ios 240.0 KiB (mean 20 us, p50 <= 31 us, p99 <= 31 us)  {FILES['weights']}" in text
    assert f"    swap file     0 ios 0 B  {FILES['swap']}" in text
    assert ("  steps         2 traced (1 missed)  mean 10.00 ms: compute 6.00 ms, I/O wait 3.50 ms"
            "  read 1.0 MiB/step") in text
    rows = text.split("SEGMENT")[1].splitlines()
    assert rows[1].split() == ["layer.1", "4.000", "3.000"] and rows[2].split() == ["layer.0", "2.000", "0.500"]
    off = dict(st, available=False, reason="weights are all resident", steps=0)
    text = report.format_interval(dict(d, steps=off))
    assert "  steps         3 run; no per-layer trace: weights are all resident" in text


def test_table_of_procfs_interval():
    sec = {"process": {"read_bytes": 2 << 20, "rchar": 5, "syscr": 7, "utime_ms": 10.0, "stime_ms": 5.0,
                       "minflt": 3, "majflt": 0, "voluntary_ctxt_switches": 4, "threads": 2},
           "system": {"pgfault": 9}}
    d = report.build_interval(index=2, t_s=2, interval_s=1, source="procfs", pids=[5], sections=sec, tokens=3)
    text = report.format_interval(d)
    assert "read 2.0 MiB from disk" in text and "syscr 7" in text and "page faults   minor 3  major 0" in text
    assert "system        pgfault 9" in text
    assert d["per_token"]["cpu_ms"] == 5.0 and d["per_token"]["syscr"] == round(7 / 3, 3)
