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


def test_engine_steps_and_files():
    from tests.trace.test_report import FILES
    from tests.trace.test_steps import REPLY
    from kvmm_daemon.trace import steps

    d = report.build_interval(index=1, t_s=1.0, interval_s=1.0, source="bpf", pids=[42], tokens=3,
                              sections=report.bpf_sections(DELTA, tuple(PROBES), FILES),
                              steps=steps.section(REPLY, REPLY["steps"], ran=3, t0=100.0))
    trace = perfetto.build_trace([d], pid=42, label="kvmm serve")
    events = trace["traceEvents"]
    assert {"name": "engine steps (daemon step trace)"} in [e["args"] for e in events if e["ph"] == "M"]
    on_steps = [e for e in events if e["ph"] == "X" and e["tid"] == perfetto.STEPS_TID]
    first = on_steps[:5]
    assert [(e["name"], e["ts"], e["dur"]) for e in first] == [
        ("step", 0.0, 10000.0), ("io wait layer.0", 0.0, 1000.0), ("layer.0", 1000.0, 2000.0),
        ("io wait layer.1", 3000.0, 3000.0), ("layer.1", 6000.0, 4000.0)]
    assert len(on_steps) == 15 and on_steps[5]["ts"] == 1e6
    c = perfetto.counters(d)
    assert c["step time (ms/step)"] == {"compute": 6.0, "io wait": 4.0}
    assert c["file block latency (mean us)"] == {"weights": 20.0, "swap": 0}
    interval = next(e for e in events if e["ph"] == "X" and e["tid"] == perfetto.TRACK_TID)
    assert interval["args"]["steps"]["stall_ms"] == 4.0


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
