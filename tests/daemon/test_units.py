"""systemd/: the units pass `systemd-analyze verify` without a warning, the sysusers and
tmpfiles snippets apply to a scratch root, and kvmm.toml loads as a DaemonConfig."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvmm_daemon.daemon.daemon_config import DaemonConfig

UNITS = Path(__file__).resolve().parents[2] / "systemd"
KVMM = str(Path(sys.executable).with_name("kvmm"))
needs_systemd = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze is not installed")


ALL_UNITS = ("kvmm.service", "kvmm.socket", "kvmm-http.socket", "kvmm-view.service", "kvmm-view.socket")


def verify(directory: Path, *units: str) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", "verify", "--man=no", *[str(directory / u) for u in units]],
                          capture_output=True, text=True, timeout=120)


def units_copy(tmp_path: Path) -> Path:
    """The units with ExecStart pointing at this venv's kvmm (it must exist to verify)."""
    for name in ALL_UNITS:
        text = (UNITS / name).read_text().replace("/usr/local/bin/kvmm", KVMM)
        (tmp_path / name).write_text(text)
    return tmp_path


@needs_systemd
def test_units_verify_cleanly(tmp_path):
    d = units_copy(tmp_path)
    r = verify(d, *ALL_UNITS)
    assert r.returncode == 0 and r.stdout.strip() == "" and r.stderr.strip() == "", r.stdout + r.stderr


@needs_systemd
def test_verify_would_catch_a_broken_unit(tmp_path):
    """Guards the test above: verify warns on a bad setting and fails on a missing binary."""
    d = units_copy(tmp_path)
    text = (d / "kvmm.service").read_text()
    (d / "kvmm.service").write_text(text.replace("Type=notify", "Type=notifyy"))
    assert "notifyy" in verify(d, "kvmm.service").stderr
    (d / "kvmm.service").write_text(text.replace(KVMM, "/nonexistent/kvmm"))
    assert verify(d, "kvmm.service").returncode != 0


def test_service_has_what_the_daemon_needs():
    s = (UNITS / "kvmm.service").read_text()
    settings = dict(re.findall(r"^(\w+)=(.*)$", s, re.M))
    assert settings["Type"] == "notify" and settings["Restart"] == "on-failure"
    assert int(settings["WatchdogSec"]) > 0
    # the engine holds no capability and lives in its own mount and network namespaces
    assert settings["CapabilityBoundingSet"] == "" and settings["AmbientCapabilities"] == ""
    assert settings["LimitMEMLOCK"] == "infinity" and settings["NoNewPrivileges"] == "yes"
    for namespaced in ("PrivateTmp", "ProtectHome", "PrivateDevices", "PrivateNetwork"):
        assert settings[namespaced] == "yes", namespaced
    assert settings["ProtectSystem"] == "strict" and settings["RestrictAddressFamilies"] == "AF_UNIX"
    assert "io_uring_setup" in s and "@system-service" in s
    # the FUSE mount is the view mounter's, in the host's mount namespace
    view = dict(re.findall(r"^(\w+)=(.*)$", (UNITS / "kvmm-view.service").read_text(), re.M))
    assert view["CapabilityBoundingSet"] == "CAP_SYS_ADMIN" and view["DeviceAllow"] == "/dev/fuse rw"
    for namespaced in ("ProtectSystem", "PrivateTmp", "ProtectHome", "PrivateDevices"):
        assert namespaced not in view          # the FUSE mount must reach the host
    vsock = dict(re.findall(r"^(\w+)=(.*)$", (UNITS / "kvmm-view.socket").read_text(), re.M))
    assert vsock["SocketUser"] == "kvmm" and vsock["SocketMode"] == "0600"
    # MemoryMax a margin above the budgets of the shipped config (+512 MiB runtime overhead)
    cfg = DaemonConfig.load(str(UNITS / "kvmm.toml"), env={})
    budgets = cfg.engine.kv_budget + (cfg.engine.weight_budget or 0)
    memory_max = int(settings["MemoryMax"].rstrip("M")) << 20
    assert budgets + (512 << 20) < memory_max < 2 * (budgets + (512 << 20))
    sock = dict(re.findall(r"^(\w+)=(.*)$", (UNITS / "kvmm.socket").read_text(), re.M))
    assert sock["ListenStream"] == cfg.socket and sock["SocketMode"] == "0660"
    assert sock["SocketGroup"] == cfg.socket_group == "kvmm"
    http = dict(re.findall(r"^(\w+)=(.*)$", (UNITS / "kvmm-http.socket").read_text(), re.M))
    assert http["ListenStream"] == cfg.http_socket and http["FileDescriptorName"] == "http"
    assert http["SocketMode"] == "0660" and http["Service"] == "kvmm.service"
    assert settings["Sockets"].split() == ["kvmm.socket", "kvmm-http.socket"]
    assert vsock["ListenStream"] == cfg.view_mounter


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None or os.geteuid() != 0,
                    reason="needs systemd-sysusers and root")
def test_sysusers_and_tmpfiles_apply_to_a_scratch_root(tmp_path):
    (tmp_path / "etc").mkdir()
    subprocess.run(["systemd-sysusers", f"--root={tmp_path}", str(UNITS / "sysusers.d/kvmm.conf")],
                   check=True, capture_output=True, timeout=60)
    passwd = (tmp_path / "etc/passwd").read_text()
    assert re.search(r"^kvmm:x:\d+:\d+:kvmm LLM daemon:/var/lib/kvmm:/usr/sbin/nologin$", passwd, re.M)
    subprocess.run(["systemd-tmpfiles", f"--root={tmp_path}", "--create", str(UNITS / "tmpfiles.d/kvmm.conf")],
                   check=True, capture_output=True, timeout=60)
    uid = int(re.search(r"^kvmm:x:(\d+):", passwd, re.M).group(1))
    for path, mode in (("run/kvmm", 0o755), ("var/lib/kvmm", 0o755), ("var/lib/kvmm/swap", 0o750)):
        st = (tmp_path / path).stat()
        assert st.st_uid == uid and st.st_mode & 0o777 == mode, path
