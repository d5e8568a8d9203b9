"""The HTTP API as a service: socket-activated next to the msgpack socket (two fds told apart
by LISTEN_FDNAMES), and SIGTERM draining — in-flight streams finish, new work gets 503."""
from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time

from tests.daemon.conftest import DaemonProcess

from .conftest import unix_http

WRAPPER = ("import fcntl, os, sys; fds = [fcntl.fcntl(int(f), fcntl.F_DUPFD, 10) for f in sys.argv[1:3]]; "
           "[os.dup2(f, 3 + i) for i, f in enumerate(fds)]; os.environ['LISTEN_PID'] = str(os.getpid()); "
           "os.execv(sys.argv[3], sys.argv[3:])")


def _listening(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(16)
    return s


def test_socket_activated_http_drains_with_503(slow_model, sock_dir):
    kvmm_path, http_path = os.path.join(sock_dir, "kvmm.sock"), os.path.join(sock_dir, "http.sock")
    a, b = _listening(kvmm_path), _listening(http_path)
    d = DaemonProcess(slow_model, args=["--socket", os.path.join(sock_dir, "unused.sock"),
                                        "--grace-period", "60", "--socket-group", ""],
                      env={"LISTEN_FDS": "2", "LISTEN_FDNAMES": "kvmm.socket:http"},
                      pass_fds=(a.fileno(), b.fileno()), prefix=[sys.executable, "-c", WRAPPER,
                                                                  str(a.fileno()), str(b.fileno())],
                      socket=kvmm_path)
    a.close()
    b.close()
    try:
        assert "using http socket %s passed by systemd" % http_path in d.log()
        with unix_http(http_path) as busy, unix_http(http_path) as other:
            assert other.get("/health").json()["status"] == "ok"            # a kept-alive connection
            body = {"model": "slow-llama", "prompt": "The quick brown fox", "max_tokens": 400,
                    "ignore_eos": True, "stream": True}
            with busy.stream("POST", "/v1/completions", json=body) as r:
                lines = r.iter_lines()
                assert next(line for line in lines if line.startswith("data: "))
                d.proc.send_signal(signal.SIGTERM)
                time.sleep(0.3)
                health = other.get("/health")
                assert health.status_code == 503 and health.json()["status"] == "draining"
                refused = other.post("/v1/completions", json={"model": "slow-llama", "prompt": "x", "max_tokens": 2})
                assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
                rest = [line[6:] for line in lines if line.startswith("data: ")]
            assert rest[-1] == "[DONE]" and json.loads(rest[-2])["choices"][0]["finish_reason"] == "length"
        assert d.proc.wait(60) == 0                   # the drain is over: it exits by itself
        assert os.path.exists(http_path)              # systemd's socket: not ours to unlink
        assert "Traceback" not in d.log()
    finally:
        d.cleanup()
