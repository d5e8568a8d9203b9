import json

from kvmm_daemon.trace import perfetto, report
from kvmm_daemon.trace.programs import PROBES

from tests.trace.test_report import DELTA


def intervals():
    out = []
    for i in range(3):
        secs = report.bpf_sections(DELTA, tuple(PROBES))
        out.append(report.build_interval(index=i + 1, t_s=0.5 * (i + 1), interval_s=0.5, source="bpf", pids=[42],
                                         sections=secs, tokens=10 * i))
    return out


def test_trace_event_shape():
    trace = perfetto.build_trace(intervals(), pid=42, label="kvmm serve", other={"pids": [42]})
    json.loads(json.dumps(trace))
    assert trace["displayTimeUnit"] == "ms" and trace["otherData"] == {"pids": [42]}
    events = trace["traceEvents"]
    assert {e["ph"] for e in events} == {"M", "C", "X"}
    assert all(e["pid"] == 42 for e in events)
    meta = [e for e in events if e["ph"] == "M"]
    assert {m["name"] for m in meta} == {"process_name", "thread_name"}
    slices = [e for e in events if e["ph"] == "X"]
    assert [(s["ts"], s["dur"]) for s in slices] == [(0, 500000), (500000, 500000), (1000000, 500000)]
    assert slices[0]["args"]["top_syscalls"] == {"futex": 300, "read": 300, "pread64": 100}
    counters = [e for e in events if e["ph"] == "C"]
    for c in counters:
        assert isinstance(c["ts"], int) and c["args"]
        assert all(isinstance(v, (int, float)) for v in c["args"].values())
    by_name: dict[str, list] = {}
    for c in counters:
        by_name.setdefault(c["name"], []).append(c)
    syscalls = by_name["syscalls/s"]
    assert [c["ts"] for c in syscalls] == [0, 500000, 1000000, 1500000]   # + the closing sample
    assert syscalls[0]["args"] == {"count": 1400.0} and syscalls[-1]["args"] == {"count": 0}
    assert by_name["off-CPU (ms/s)"][0]["args"] == {"io": 6.0, "sleep": 14.0, "preempted": 0.0}
    assert by_name["tokens/s"][1]["args"] == {"tokens": 20.0}
    assert by_name["block I/O (MiB/s)"][0]["args"]["read"] == round(409600 / 2**20 / 0.5, 3)


def test_procfs_counters():
    d = report.build_interval(index=1, t_s=2, interval_s=2, source="procfs", pids=[1], tokens=None,
                              sections={"process": {"read_bytes": 4 << 20, "syscr": 10, "minflt": 4,
                                                    "utime_ms": 100.0}, "system": {}})
    c = perfetto.counters(d)
    assert c["disk I/O (MiB/s)"] == {"read_bytes": 2.0}
    assert c["read/write syscalls/s"] == {"syscr": 5.0}
    assert c["CPU (ms/s)"] == {"utime_ms": 50.0}
    assert "context switches/s" not in c and "tokens/s" not in c


def test_write_trace_is_atomic(tmp_path):
    path = tmp_path / "t.json"
    perfetto.write_trace(str(path), perfetto.build_trace(intervals(), pid=1, label="x"))
    assert json.loads(path.read_text())["traceEvents"]
    assert [p.name for p in tmp_path.iterdir()] == ["t.json"]
