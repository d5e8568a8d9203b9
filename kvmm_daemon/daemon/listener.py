"""The daemon's listening Unix socket: inherited from systemd (LISTEN_FDS) or bound here.

Socket activation (sd_listen_fds(3)): when $LISTEN_PID is our pid and $LISTEN_FDS >= 1, fds
3.. are listening sockets that systemd bound from kvmm.socket and kvmm-http.socket (with their
mode and group); we use them as they are and never unlink their paths. $LISTEN_FDNAMES tells
them apart: the fd named "http" (FileDescriptorName=http) serves the HTTP API and may also be
a TCP socket; the first other one serves the msgpack protocol. Otherwise we bind `DaemonConfig.socket` ourselves: create the
directory, refuse to steal the path from a live daemon (a connect succeeds), remove a stale
socket file, bind, then chmod 0660 and chown to the configured group so that only members of
the group can connect.

Prior art: libsystemd's sd_listen_fds.c (the pid check, unsetting the variables), and the way
Docker/containerd prepare their sockets. Left out: more than one socket per role (extra fds
are closed with a warning).
"""
from __future__ import annotations

import errno
import logging
import os
import socket
import stat
from dataclasses import dataclass
from typing import Mapping

from kvmm_daemon.errors import ConfigError

log = logging.getLogger("kvmm.listener")
SD_LISTEN_FDS_START = 3


@dataclass(frozen=True, slots=True)
class Listener:
    sock: socket.socket
    path: str              # the path clients connect to (for TCP: "tcp HOST:PORT")
    activated: bool        # True: systemd owns the path; do not unlink it on exit

    def close(self) -> None:
        unix = self.sock.family == socket.AF_UNIX
        self.sock.close()
        if unix and not self.activated:
            try:
                if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                    os.unlink(self.path)
            except FileNotFoundError:
                pass


HTTP_FD_NAMES = ("http", "kvmm-http.socket")


def inherited_sockets(env: Mapping[str, str] | None = None, *, unset: bool = True) -> dict[str, socket.socket]:
    """The listening sockets systemd passed to us, by role ("kvmm", "http"); {} without
    socket activation."""
    env = os.environ if env is None else env
    pid, nfds, names = env.get("LISTEN_PID"), env.get("LISTEN_FDS"), env.get("LISTEN_FDNAMES", "")
    if unset and env is os.environ:
        for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(var, None)
    if not pid or not nfds:
        return {}
    if pid != str(os.getpid()):
        log.info("ignoring LISTEN_FDS meant for pid %s", pid)
        return {}
    try:
        count = int(nfds)
    except ValueError:
        raise ConfigError(f"LISTEN_FDS={nfds!r} is not a number; check kvmm.socket") from None
    fd_names = names.split(":") if names else []
    out: dict[str, socket.socket] = {}
    for i in range(count):
        fd = SD_LISTEN_FDS_START + i
        role = "http" if i < len(fd_names) and fd_names[i] in HTTP_FD_NAMES else "kvmm"
        if role in out:
            log.warning("closing extra inherited fd %d: kvmm listens on one %s socket", fd, role)
            os.close(fd)
            continue
        out[role] = _check_inherited(fd, role)
    return out


def _check_inherited(fd: int, role: str) -> socket.socket:
    sock = socket.socket(fileno=fd)
    families = (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6) if role == "http" else (socket.AF_UNIX,)
    if sock.family not in families or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise ConfigError(f"the socket passed by systemd as fd {fd} is not a Unix stream socket; "
                          f"use ListenStream=/run/kvmm/kvmm.sock in kvmm.socket")
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        raise ConfigError(f"the socket passed by systemd as fd {fd} is not listening; use "
                          f"ListenStream= (Accept=no) in kvmm.socket")
    sock.set_inheritable(False)
    return sock


def inherited_socket(env: Mapping[str, str] | None = None, *, unset: bool = True) -> socket.socket | None:
    """The msgpack socket passed by systemd, else None (see inherited_sockets)."""
    return inherited_sockets(env, unset=unset).get("kvmm")


def bind_socket(path: str, *, gid: int | None, mode: int = 0o660, backlog: int = 128) -> socket.socket:
    """Bind and listen on `path` with `mode` and group `gid`; ConfigError naming the fix."""
    directory = os.path.dirname(path)
    try:
        os.makedirs(directory, mode=0o755, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create socket directory {directory}: {exc.strerror}; "
                          f"create it or choose another --socket") from None
    _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old_umask = os.umask(0o177)          # no window in which the socket is world-connectable
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot bind socket {path}: {exc.strerror}; choose another --socket") from None
    finally:
        os.umask(old_umask)
    try:
        if gid is not None:
            os.chown(path, -1, gid)
        os.chmod(path, mode)
    except OSError as exc:
        sock.close()
        os.unlink(path)
        raise ConfigError(f"cannot set group/mode of {path}: {exc.strerror}; run as root or "
                          f"set socket_group = \"\"") from None
    sock.listen(backlog)
    return sock


def _remove_stale(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{path} exists and is not a socket; remove it or choose another --socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise ConfigError(f"cannot probe existing socket {path}: {exc.strerror}") from None
        os.unlink(path)           # nobody listens: a leftover of a killed daemon
        log.info("removed stale socket %s", path)
    else:
        raise ConfigError(f"another daemon is listening on {path}; stop it "
                          f"(systemctl stop kvmm) or choose another --socket")
    finally:
        probe.close()


def open_listener(path: str, *, gid: int | None, mode: int = 0o660,
                  env: Mapping[str, str] | None = None,
                  inherited: Mapping[str, socket.socket] | None = None, role: str = "kvmm") -> Listener:
    """The socket of `role` passed by systemd when socket-activated, else a freshly bound one.
    `inherited` is what `inherited_sockets()` returned (read from `env` when None)."""
    sock = (inherited_sockets(env) if inherited is None else inherited).get(role)
    if sock is not None:
        name = sock.getsockname()
        where = (name if isinstance(name, str) and name else path) if sock.family == socket.AF_UNIX \
            else "%s:%d" % name[:2]
        log.info("using %s socket %s passed by systemd (socket activation)", role, where)
        return Listener(sock, where, activated=True)
    return Listener(bind_socket(path, gid=gid, mode=mode), path, activated=False)
