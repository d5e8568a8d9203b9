"""The listening socket: bound with mode and group, stale files removed, a live daemon's socket
never stolen, and socket activation from fd 3 (checked in a child process that owns fd 3)."""
import os
import socket
import stat
import subprocess
import sys

import pytest

from kvmm_daemon.daemon.listener import bind_socket, inherited_socket, open_listener
from kvmm_daemon.errors import ConfigError



def test_bind_sets_mode_and_group_and_close_unlinks(sock_dir):
    d = sock_dir
    path = os.path.join(d, "sub", "k.sock")
    lst = open_listener(path, gid=os.getgid(), mode=0o660, env={})
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode) and st.st_mode & 0o777 == 0o660 and not lst.activated
    lst.close()
    assert not os.path.exists(path)


def test_stale_socket_is_replaced_but_a_live_one_is_not(sock_dir):
    d = sock_dir
    path = os.path.join(d, "k.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()                                   # file left behind, nobody listening
    live = bind_socket(path, gid=None)
    with pytest.raises(ConfigError, match="another daemon is listening"):
        bind_socket(path, gid=None)
    live.close()
    open(os.path.join(d, "file"), "w").close()
    with pytest.raises(ConfigError, match="not a socket"):
        bind_socket(os.path.join(d, "file"), gid=None)


def test_no_activation_without_or_with_foreign_listen_pid():
    assert inherited_socket({}) is None
    assert inherited_socket({"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1"}) is None


CHILD = r"""
import os, socket, sys
from kvmm_daemon.daemon.listener import open_listener
from kvmm_daemon.errors import ConfigError
os.dup2(int(sys.argv[1]), 3)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1")
try:
    lst = open_listener("/unused/path.sock", gid=None)
except ConfigError as exc:
    print("ERROR", exc); sys.exit(0)
assert "LISTEN_FDS" not in os.environ
conn, _ = lst.sock.accept()
conn.sendall(b"hello from fd 3")
print("OK", lst.activated, lst.path, lst.sock.fileno())
"""


def _activate(sock):
    return subprocess.Popen([sys.executable, "-c", CHILD, str(sock.fileno())], pass_fds=(sock.fileno(),),
                            stdout=subprocess.PIPE, text=True)


def test_socket_activation_takes_fd_3(sock_dir):
    d = sock_dir
    path = os.path.join(d, "act.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(4)
    child = _activate(srv)
    c = socket.socket(socket.AF_UNIX)
    c.settimeout(30)
    c.connect(path)
    assert c.recv(100) == b"hello from fd 3"
    out, _ = child.communicate(timeout=60)
    assert out.split() == ["OK", "True", path, "3"]


def test_activation_rejects_a_socket_that_does_not_listen():
    s = socket.socket(socket.AF_UNIX)                # bound nowhere, not listening
    child = _activate(s)
    out, _ = child.communicate(timeout=60)
    assert out.startswith("ERROR") and "ListenStream" in out
