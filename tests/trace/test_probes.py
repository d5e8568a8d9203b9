import os

from kvmm_daemon.trace import probes
from kvmm_daemon.trace.probes import CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN, Environment, select_probes

MOUNTS = """sysfs /sys sysfs rw 0 0
proc /proc proc rw 0 0
/dev/vda / ext4 rw 0 0
"""


def test_find_tracefs():
    assert probes.find_tracefs(MOUNTS) is None
    assert probes.find_tracefs(MOUNTS + "tracefs /sys/kernel/tracing tracefs rw 0 0\n") == "/sys/kernel/tracing"


def test_bpf_capable():
    assert probes.bpf_capable(1 << CAP_SYS_ADMIN)
    assert probes.bpf_capable((1 << CAP_BPF) | (1 << CAP_PERFMON))
    assert not probes.bpf_capable(1 << CAP_BPF)
    assert not probes.bpf_capable(0)
    assert probes.bpf_capable(0x1ffffffffff)   # root's usual CapEff


def test_missing_names_each_requirement():
    ok = Environment(0, True, None, "/lib/modules/6.1/build", "", "/sys/kernel/tracing", "6.1")
    assert ok.missing() == []
    bad = Environment(1000, False, "ModuleNotFoundError: No module named 'bcc'", None,
                      "/lib/modules/6.1/build (absent)", None, "6.1")
    m = bad.missing()
    assert len(m) == 4
    assert m[0].startswith("no BPF privileges: not root (euid 1000)") and "sudo" in m[0]
    assert "No module named 'bcc'" in m[1] and "python3-bpfcc" in m[1]
    assert "no kernel headers for 6.1: tried /lib/modules/6.1/build (absent)" in m[2]
    assert "linux-headers-6.1" in m[2]
    assert m[3] == "tracefs is not mounted: mount -t tracefs nodev /sys/kernel/tracing (as root)"


def test_find_kernel_headers(tmp_path, monkeypatch):
    monkeypatch.delenv("BCC_KERNEL_SOURCE", raising=False)
    path, tried = probes.find_kernel_headers("0.0-no-such-release")
    if not os.path.exists("/sys/kernel/kheaders.tar.xz"):
        assert path is None and "/lib/modules/0.0-no-such-release/build (absent)" in tried
    (tmp_path / "include").mkdir()
    monkeypatch.setenv("BCC_KERNEL_SOURCE", str(tmp_path))
    assert probes.find_kernel_headers("0.0-no-such-release") == (str(tmp_path), "")
    dangling = tmp_path / "link"
    dangling.symlink_to(tmp_path / "nowhere")
    monkeypatch.setenv("BCC_KERNEL_SOURCE", str(dangling))
    assert f"{dangling} (dangling link)" in probes.find_kernel_headers("0.0-no-such-release")[1]


def test_tracepoint_exists(tmp_path):
    (tmp_path / "events" / "sched" / "sched_switch").mkdir(parents=True)
    assert probes.tracepoint_exists(str(tmp_path), "sched:sched_switch")
    assert not probes.tracepoint_exists(str(tmp_path), "fuse:fuse_request_send")


def test_select_probes_degrades_per_probe():
    present = {"block:block_rq_issue", "block:block_rq_complete", "raw_syscalls:sys_enter", "raw_syscalls:sys_exit",
               "sched:sched_switch", "fuse:fuse_request_send"}
    sel = select_probes(["block", "syscalls", "offcpu", "fuse", "faults"], present.__contains__, follow_children=True)
    assert sel.enabled == ("block", "syscalls", "offcpu")
    assert not sel.bio_queue and not sel.follow_children
    notes = "\n".join(sel.notes)
    assert "fuse: tracepoint fuse:fuse_request_end missing" in notes
    assert "faults: tracepoint exceptions:page_fault_user missing; user page faults not traced" in notes
    assert "block:block_bio_queue missing" in notes
    assert "children: tracepoint sched:sched_process_fork or sched:sched_process_exit missing" in notes
    everything = select_probes(["syscalls"], lambda tp: True, follow_children=True)
    assert everything.enabled == ("syscalls",) and everything.follow_children and everything.notes == ()
