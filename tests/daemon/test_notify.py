"""sd_notify over a datagram socket of the test's own, as systemd would read it."""
import os
import socket

from kvmm_daemon.daemon.notify import SystemdNotifier


def receiver(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(5)
    return s


def test_messages_reach_the_socket(tmp_path):
    path = str(tmp_path / "notify")
    rx = receiver(path)
    n = SystemdNotifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "3000000"})
    assert n.enabled and n.ping_interval_s == 1.5
    assert n.ready("serving")
    assert rx.recv(4096) == b"READY=1\nSTATUS=serving"
    assert n.watchdog()
    assert rx.recv(4096) == b"WATCHDOG=1"
    assert n.stopping()
    assert rx.recv(4096) == b"STOPPING=1\nSTATUS=draining"
    assert n.statistics().sent == 3
    n.close()
    rx.close()


def test_abstract_socket_name():
    name = f"kvmm-test-{os.getpid()}"
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind("\0" + name)
    rx.settimeout(5)
    n = SystemdNotifier.from_env({"NOTIFY_SOCKET": "@" + name})
    assert n.status("hello")
    assert rx.recv(100) == b"STATUS=hello"
    rx.close()


def test_disabled_without_systemd_and_watchdog_for_another_pid():
    n = SystemdNotifier.from_env({})
    assert not n.enabled and not n.ready("x") and not n.watchdog() and n.ping_interval_s is None
    n = SystemdNotifier.from_env({"NOTIFY_SOCKET": "/nonexistent/notify", "WATCHDOG_USEC": "1000000",
                                  "WATCHDOG_PID": str(os.getpid() + 1)})
    assert n.ping_interval_s is None
    assert not n.ready("x") and n.statistics().failed == 1      # refused, counted, not raised


def test_from_os_environ_unsets_the_variables(monkeypatch, tmp_path):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "n"))
    monkeypatch.setenv("WATCHDOG_USEC", "100")
    n = SystemdNotifier.from_env()
    assert "NOTIFY_SOCKET" not in os.environ and "WATCHDOG_USEC" not in os.environ
    assert n.watchdog_usec == 100
