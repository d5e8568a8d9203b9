"""Shared helpers of the daemon tests: raw frames on a socket, waiting for the daemon to idle."""
from __future__ import annotations

import os
import pickle
import socket
import struct
import time

from kvmm_daemon.client import Client
from kvmm_daemon import protocol as P


OTHER_UID = OTHER_GID = 65534          # nobody / nogroup: the second identity of the tests


class RawConn:
    """A bare protocol connection for sending arbitrary bytes and reading replies."""

    def __init__(self, path: str, timeout: float = 20):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.dec = P.FrameDecoder(P.CLIENT_MAX_FRAME)
        self.buf: list[dict] = []

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, msg: dict) -> None:
        self.sock.sendall(P.encode_frame(msg))

    def recv(self) -> dict | None:
        """The next reply, or None at EOF."""
        while not self.buf:
            data = self.sock.recv(65536)
            if not data:
                return None
            self.buf += [P.decode_body(b) for b in self.dec.feed(data)]
        return self.buf.pop(0)

    def call(self, op: str, id: int = 1, **fields) -> dict:
        self.send({"v": 1, "id": id, "op": op, **fields})
        return self.recv()

    def abort(self) -> None:
        """Close with a TCP-style reset: no orderly shutdown."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        self.sock.close()


def wait_idle(path: str, timeout: float = 20) -> dict:
    """Stats once no request is running, waiting or tracked by the server."""
    deadline = time.monotonic() + timeout
    with Client(path, timeout=10) as c:
        while True:
            s = c.stats()
            if (s["requests"]["running"] == 0 and s["requests"]["waiting"] == 0
                    and s["server"]["requests_in_flight"] == 0):
                return s
            if time.monotonic() > deadline:
                raise AssertionError(f"daemon not idle after {timeout} s: {s}")
            time.sleep(0.05)


def session_blocks(stats: dict) -> int:
    """KV blocks held by parked sessions: their history minus the last token, rounded up."""
    bs = stats["block_size"]
    return sum(-(-(s["num_tokens"] - 1) // bs) for s in stats["sessions"] if s["kv_resident"])


def run_as(uid: int, gid: int, fn, *args):
    """Run fn(*args) in a forked child with uid/gid and no supplementary groups; return its
    result or re-raise its exception here."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                    # child: never return into pytest
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            try:
                out = (True, fn(*args))
            except BaseException as exc:            # noqa: BLE001 - shipped to the parent
                out = (False, exc)
            with os.fdopen(w, "wb") as f:
                pickle.dump(out, f)
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    ok, value = pickle.loads(data)
    if not ok:
        raise value
    return value
