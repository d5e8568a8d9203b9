"""The service's life under a test that plays systemd: sd_notify READY/WATCHDOG/STOPPING on a
datagram socket of our own in NOTIFY_SOCKET, socket activation with a pre-bound socket handed
over as fd 3 (LISTEN_FDS/LISTEN_PID), and SIGTERM draining with a grace period."""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time

import pytest

from kvmm_daemon.client import Client, ConnectionLost, DaemonUnavailable, ShuttingDown

from .conftest import DaemonProcess
from .helpers import RawConn


class FakeSystemd:
    """The manager's end of NOTIFY_SOCKET: collects datagrams in a thread."""

    def __init__(self, directory: str):
        self.path = os.path.join(directory, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[dict[str, str]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self):
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            self.messages.append(dict(line.split("=", 1) for line in data.decode().splitlines()))

    def wait_for(self, key: str, timeout: float = 60) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in self.messages:
                if key in m:
                    return m
            time.sleep(0.02)
        raise AssertionError(f"no {key} within {timeout} s; got {self.messages}")

    def count(self, key: str) -> int:
        return sum(key in m for m in self.messages)

    def close(self):
        self._stop = True
        self._thread.join()
        self.sock.close()


def activated_daemon(model, listen_sock: socket.socket, env: dict, args=()) -> DaemonProcess:
    """Start kvmm serve the way systemd does: the listening socket as fd 3, LISTEN_PID = its pid
    (a wrapper dup2()s the socket to fd 3, sets LISTEN_PID to its own pid and exec()s kvmm)."""
    fd = listen_sock.fileno()
    wrapper = [sys.executable, "-c",
               "import os, sys; os.dup2(int(sys.argv[1]), 3); os.environ['LISTEN_PID'] = str(os.getpid()); "
               "os.execv(sys.argv[2], sys.argv[2:])", str(fd)]
    return DaemonProcess(model, args=list(args), env={"LISTEN_FDS": "1", **env}, pass_fds=(fd,),
                         prefix=wrapper, socket=listen_sock.getsockname(), wait=False)


def test_notify_watchdog_and_socket_activation(tiny_model, sock_dir):
    base = sock_dir
    systemd = FakeSystemd(base)
    path = os.path.join(base, "activated.sock")
    listen = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listen.bind(path)
    listen.listen(16)
    d = activated_daemon(tiny_model, listen, {"NOTIFY_SOCKET": systemd.path, "WATCHDOG_USEC": "400000"},
                         args=["--socket", os.path.join(base, "unused.sock")])
    try:
        ready = systemd.wait_for("READY")
        assert ready["READY"] == "1" and path in ready["STATUS"]
        assert systemd.messages[0].get("STATUS") == "loading model"
        listen.close()                              # the daemon holds its own copy of fd 3
        with Client(path) as c:
            assert c.health()["status"] == "ok"
            assert c.generate("hi", raw=True, max_tokens=3).usage["completion_tokens"] >= 1
        assert not os.path.exists(os.path.join(base, "unused.sock"))
        pings = systemd.count("WATCHDOG")
        time.sleep(1.0)                             # idle: pings continue every 0.2 s
        assert systemd.count("WATCHDOG") >= pings + 3
        assert "socket activation" in d.log()
        assert d.stop() == 0
        stopping = systemd.wait_for("STOPPING")
        assert stopping["STOPPING"] == "1"
        assert os.path.exists(path)                 # systemd's socket: not ours to unlink
    finally:
        d.cleanup()
        systemd.close()


def test_sigterm_lets_in_flight_requests_finish_and_refuses_new_ones(slow_model):
    d = DaemonProcess(slow_model, args=["--grace-period", "60", "--socket-group", ""])
    try:
        busy = RawConn(d.socket)
        busy.send({"v": 1, "id": 1, "op": "generate", "prompt": "The quick brown fox", "raw": True,
                   "params": {"max_tokens": 400, "ignore_eos": True}, "stream": False})
        assert busy.recv()["type"] == "accepted"
        other = Client(d.socket)
        d.proc.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        with pytest.raises(ShuttingDown):
            other.generate("x", raw=True, max_tokens=2)
        assert other.health()["status"] == "draining"
        with pytest.raises(DaemonUnavailable):
            Client(d.socket)                        # no longer accepting: the path is gone
        done = busy.recv()
        assert done["type"] == "done" and done["choices"][0]["finish_reason"] == "length"
        assert len(done["choices"][0]["token_ids"]) == 400
        assert d.proc.wait(60) == 0
        with pytest.raises(ConnectionLost):
            other.health()
        assert "draining: 1 requests in flight" in d.log()
    finally:
        d.cleanup()


def test_grace_period_over_cancels_the_rest_and_exits_0(slow_model):
    d = DaemonProcess(slow_model, args=["--grace-period", "0.2", "--socket-group", ""])
    try:
        with Client(d.socket) as c:
            with c.stream("The quick brown fox", raw=True, max_tokens=450, ignore_eos=True) as s:
                it = iter(s)
                next(it)
                d.proc.send_signal(signal.SIGTERM)
                rest = list(it)
            assert s.result.finish_reason == "abort"
            assert len(s.result.token_ids) < 450 and rest is not None
        assert d.proc.wait(60) == 0
        assert "grace period over: cancelling 1 requests" in d.log()
    finally:
        d.cleanup()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as a second uid")
def test_sessions_keep_their_owner_across_a_restart(tiny_model, sock_dir):
    """With the flash tier a session survives SIGTERM + start; it still belongs to its uid."""
    import grp

    from .helpers import OTHER_GID, OTHER_UID, run_as

    swap = sock_dir
    args = ["--swap-dir", swap, "--swap-size", "16MiB", "--socket-group", grp.getgrgid(OTHER_GID).gr_name]

    def turn(path, prompt):
        with Client(path) as c:
            r = c.generate(prompt, raw=True, session="keep", max_tokens=6, ignore_eos=True)
            return r.usage, [s["session"] for s in c.sessions()]

    d = DaemonProcess(tiny_model, args=args)
    try:
        first, listed = run_as(OTHER_UID, OTHER_GID, turn, d.socket, "The dog sleeps; the fox runs away.")
        assert listed == ["keep"] and first["cached_prompt_tokens"] == 0
        assert d.stop() == 0
    finally:
        d.cleanup()
    d = DaemonProcess(tiny_model, args=args)
    try:
        with Client(d.socket) as c:
            assert [(s["session"], s["owner_uid"]) for s in c.sessions()] == [(f"{OTHER_UID}:keep", OTHER_UID)]
            assert c.sessions() and [s["session"] for s in c.stats()["sessions"]] == [f"{OTHER_UID}:keep"]
        second, listed = run_as(OTHER_UID, OTHER_GID, turn, d.socket, " The quick brown fox")
        assert listed == ["keep"]
        assert second["prompt_tokens"] > first["prompt_tokens"] + first["completion_tokens"]
        assert second["cached_prompt_tokens"] > 0
        assert d.stop() == 0
    finally:
        d.cleanup()
