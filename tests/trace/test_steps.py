from kvmm_daemon.trace import steps

REPLY = {"available": True, "reason": None, "steps_total": 12, "segments": ["layer.0", "layer.1"],
         "files": {"weights": "/w", "swap": None},
         "steps": [{"started": 100.0 + i, "step_s": 0.01, "bytes_read": 1000,
                    "stall_s": [0.001, 0.003], "compute_s": [0.002, 0.004]} for i in range(3)]}


def test_section_means_per_step_and_segment():
    s = steps.section(REPLY, REPLY["steps"][1:], ran=3, t0=99.5)
    assert s["steps"] == 2 and s["steps_run"] == 3 and s["missed"] == 1
    assert s["step_ms"] == 10.0 and s["compute_ms"] == 6.0 and s["stall_ms"] == 4.0 and s["bytes_read"] == 2000
    assert s["segments"] == [{"name": "layer.0", "compute_ms": 2.0, "stall_ms": 1.0},
                             {"name": "layer.1", "compute_ms": 4.0, "stall_ms": 3.0}]
    assert [r["t_s"] for r in s["records"]] == [1.5, 2.5]


def test_section_without_steps():
    s = steps.section(dict(REPLY, available=False, reason="resident", segments=[], steps=[]), [], ran=5, t0=0)
    assert s == {"available": False, "reason": "resident", "steps": 0, "steps_run": 5, "missed": 0}


def test_unreachable_daemon_says_why_once(tmp_path):
    src = steps.StepSource(str(tmp_path / "no.sock"))
    src.start()
    assert src.read(0.0) is None and src.error.startswith("daemon steps unreachable (cannot connect") and src.files == {}
