import os
import sys
import time

import pytest

from kvmm_daemon.errors import KvmmError
from kvmm_daemon.trace import target


@pytest.mark.parametrize("argv, expected", [
    (["/usr/bin/kvmm", "serve", "--socket", "/tmp/s"], True),
    (["/opt/venv/bin/python", "/opt/venv/bin/kvmm", "serve"], True),
    (["python3", "-m", "kvmm_daemon.cli", "serve"], True),
    (["kvmm", "trace", "--", "kvmm", "run", "serve"], False),
    (["kvmm", "run", "Hello"], False),
    (["vim", "serve"], False),
    ([], False),
])
def test_is_daemon_cmdline(argv, expected):
    assert target.is_daemon_cmdline(argv) is expected


def test_daemon_socket():
    assert target.daemon_socket(["kvmm", "serve", "--socket", "/tmp/a.sock"]) == "/tmp/a.sock"
    assert target.daemon_socket(["kvmm", "serve", "--socket=/tmp/b.sock"]) == "/tmp/b.sock"
    assert target.daemon_socket(["kvmm", "serve"]) is None and target.daemon_socket(["x", "--socket"]) is None


def test_find_daemons_in_a_proc_tree(tmp_path):
    for pid, argv in {"10": [b"kvmm", b"serve"], "11": [b"bash"], "12": [b"python3", b"-m", b"kvmm_daemon.cli",
                                                                          b"serve"], "self": [b"x"]}.items():
        (tmp_path / pid).mkdir()
        (tmp_path / pid / "cmdline").write_bytes(b"\0".join(argv) + b"\0")
    assert target.find_daemons(str(tmp_path)) == [10, 12]


def test_check_pid_and_alive():
    target.check_pid(os.getpid())
    assert target.alive(os.getpid())
    with pytest.raises(KvmmError, match="no process with pid 0"):
        target.check_pid(0)


def test_gated_command_waits_for_release(tmp_path):
    flag = tmp_path / "ran"
    cmd = target.GatedCommand([sys.executable, "-c", f"open({str(flag)!r}, 'w').close()"])
    try:
        time.sleep(0.3)
        assert not flag.exists() and not cmd.exited() and not cmd.released
        assert target.read_cmdline(cmd.pid)[1] == "-c"   # still the gate
        cmd.release()
        assert cmd.wait() == 0 and flag.exists()
        assert cmd.exited()
    finally:
        cmd.close()


def test_gated_command_never_released_does_not_run(tmp_path):
    flag = tmp_path / "ran"
    cmd = target.GatedCommand([sys.executable, "-c", f"open({str(flag)!r}, 'w').close()"])
    assert cmd.close() in (125, -15)
    assert not flag.exists()


def test_gated_command_that_cannot_exec():
    cmd = target.GatedCommand(["/nonexistent/tool"])
    cmd.release()
    assert cmd.wait() == 1
    with pytest.raises(KvmmError, match="no command given"):
        target.GatedCommand([])
