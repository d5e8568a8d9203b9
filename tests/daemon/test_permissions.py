"""Who may do what: a second uid (a forked child that drops to uid 65534) against root, socket
group access, and the per-uid limits. Needs root (to set up the second identity)."""
from __future__ import annotations

import grp
import os
import time

import pytest

from kvmm_daemon.client import Client, DaemonUnavailable, LimitExceeded, NotFound, PermissionDenied

from .conftest import DaemonProcess
from .helpers import OTHER_GID, OTHER_UID, RawConn, run_as, wait_idle

pytestmark = pytest.mark.root

if os.geteuid() != 0:
    pytest.skip("needs root to act as a second uid (os.setuid in a forked child)", allow_module_level=True)


@pytest.fixture(scope="module")
def limited(tiny_model):
    group = grp.getgrgid(OTHER_GID).gr_name
    d = DaemonProcess(tiny_model, args=["--socket-group", group],
                      env={"KVMM_MAX_REQUESTS_PER_UID": "2", "KVMM_MAX_KV_BLOCKS_PER_UID": "30",
                           "KVMM_MAX_SESSIONS_PER_UID": "2", "KVMM_MAX_CLIENTS": "8"})
    yield d
    code = d.stop()
    log = d.log()
    d.cleanup()
    assert code == 0, log


def _start_long(path, prompt="The quick brown fox"):
    conn = RawConn(path)
    conn.send({"v": 1, "id": 1, "op": "generate", "prompt": prompt, "raw": True,
               "params": {"max_tokens": 200, "ignore_eos": True}})
    accepted = conn.recv()
    assert accepted["type"] == "accepted", accepted
    return conn, accepted["request_id"]


def test_socket_mode_and_group(limited):
    st = os.stat(limited.socket)
    assert st.st_mode & 0o777 == 0o660 and st.st_gid == OTHER_GID


def test_uid_outside_the_group_cannot_connect(limited):
    with pytest.raises(DaemonUnavailable, match="group"):
        run_as(12345, 12345, lambda: Client(limited.socket).health())


def test_requests_are_visible_and_cancellable_only_by_owner_or_root(limited):
    root_conn, root_req = _start_long(limited.socket)

    def as_other(path, root_req):
        with Client(path) as c:
            assert c.health()["uid"] == OTHER_UID
            seen = [r["request_id"] for r in c.requests()]
            try:
                c.cancel(root_req)
                denied = False
            except PermissionDenied:
                denied = True
            with c.stream("The dog", raw=True, max_tokens=200, ignore_eos=True) as s:
                next(iter(s))
                with Client(path) as c2:                 # a second connection of the same uid
                    mine = [r["request_id"] for r in c2.requests()]
                s.cancel()
                list(s)
            return seen, denied, mine, s.request_id, s.result.finish_reason

    seen, denied, mine, other_req, reason = run_as(OTHER_UID, OTHER_GID, as_other, limited.socket, root_req)
    assert root_req not in seen and denied
    assert mine == [other_req] and reason == "abort"
    with Client(limited.socket) as c:
        assert root_req in [r["request_id"] for r in c.requests()]   # root sees its own
        c.cancel(root_req)
    root_conn.close()
    wait_idle(limited.socket)


def test_root_sees_and_cancels_another_uids_request(limited):
    def start_and_wait(path):
        with Client(path) as c:
            with c.stream("The lazy dog", raw=True, max_tokens=400, ignore_eos=True) as s:
                list(s)
            return s.result.finish_reason

    import threading
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("reason", run_as(OTHER_UID, OTHER_GID, start_and_wait, limited.socket)))
    t.start()
    with Client(limited.socket) as c:
        deadline = time.monotonic() + 20
        while not (reqs := [r for r in c.requests() if r["uid"] == OTHER_UID]):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        c.cancel(reqs[0]["request_id"])
    t.join(30)
    assert result["reason"] == "abort"


def test_sessions_are_private(limited):
    with Client(limited.socket) as c:
        c.open_session("rootonly")

    def as_other(path):
        with Client(path) as c:
            name = c.open_session("mine")
            listed = [s["session"] for s in c.sessions()]
            stats_sessions = [s["session"] for s in c.stats()["sessions"]]
            errors = []
            for ref in ("0:rootonly", "rootonly"):
                try:
                    c.delete_session(ref)
                except (PermissionDenied, NotFound) as exc:
                    errors.append(type(exc).__name__)
            return name, listed, stats_sessions, errors

    name, listed, stats_sessions, errors = run_as(OTHER_UID, OTHER_GID, as_other, limited.socket)
    assert name == "mine" and listed == ["mine"] and stats_sessions == ["mine"]
    assert errors == ["PermissionDenied", "NotFound"]
    with Client(limited.socket) as c:
        listed = {s["session"]: s["owner_uid"] for s in c.sessions()}
        assert listed == {"rootonly": 0, f"{OTHER_UID}:mine": OTHER_UID}
        c.delete_session(f"{OTHER_UID}:mine")
        c.delete_session("rootonly")
        assert c.sessions() == []


def test_per_uid_request_limit(limited):
    conns = [_start_long(limited.socket)[0] for _ in range(2)]
    with Client(limited.socket) as c:
        with pytest.raises(LimitExceeded, match="max_requests_per_uid"):
            c.generate("x", raw=True, max_tokens=2)
    # another uid is not affected by root's two requests
    out = run_as(OTHER_UID, OTHER_GID, lambda p: Client(p).generate("x", raw=True, max_tokens=2).finish_reason,
                 limited.socket)
    assert out in ("length", "stop")
    for conn in conns:
        conn.abort()
    s = wait_idle(limited.socket)
    assert s["server"]["limits"]["usage"] == []


def test_per_uid_kv_block_limit(limited):
    with Client(limited.socket) as c:
        with pytest.raises(LimitExceeded, match="max_kv_blocks_per_uid"):
            c.generate("x", raw=True, max_tokens=480)              # 31 blocks of 16 > 30
        with pytest.raises(LimitExceeded, match="max_kv_blocks_per_uid"):
            c.generate("x", raw=True, max_tokens=200, n=3, temperature=1.0)
        assert c.generate("x", raw=True, max_tokens=100).usage["completion_tokens"] >= 1


def test_per_uid_session_limit(limited):
    with Client(limited.socket) as c:
        c.open_session("a")
        c.open_session("b")
        with pytest.raises(LimitExceeded, match="max_sessions_per_uid"):
            c.open_session("c")
        c.delete_session("a")
        c.delete_session("b")


def test_implicit_sessions_count_against_the_limit(limited):
    with Client(limited.socket) as c:
        c.generate("x", raw=True, session="i1", max_tokens=1)
        c.generate("x", raw=True, session="i2", max_tokens=1)
        with pytest.raises(LimitExceeded, match="max_sessions_per_uid"):
            c.generate("x", raw=True, session="i3", max_tokens=1)
        c.delete_session("i1")
        c.delete_session("i2")


def test_max_clients(limited):
    conns = [RawConn(limited.socket) for _ in range(7)]
    for c in conns:                                 # all 7 are registered before the 9th
        assert c.call("health")["result"]["status"] == "ok"
    extra = RawConn(limited.socket)
    assert extra.call("health")["result"]["status"] == "ok"
    refused = RawConn(limited.socket)
    reply = refused.recv()
    assert reply["code"] == "limit_exceeded" and "max_clients" in reply["message"]
    assert refused.recv() is None
    for c in conns + [extra, refused]:
        c.close()
