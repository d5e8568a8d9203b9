"""Adversarial tests (issue 8, item 8): a real daemon with its swapfs view, two real
unprivileged uids (forked children that drop to them), each attack with its expected refusal,
and the daemon alive and serving afterwards.

  A = uid 12346, B = uid 65534 (nobody), both in group nogroup, which owns the socket.
"""
from __future__ import annotations

import errno
import secrets  # noqa: F401  (the client imports it lazily; the other uids cannot read the stdlib here)
import grp
import json
import os
import shutil
import struct
import tempfile
import time

import pytest

from kvmm_daemon.client import Client, InvalidRequest, PermissionDenied
from tests.daemon.conftest import DaemonProcess
from tests.daemon.helpers import OTHER_GID, RawConn, run_as, wait_idle
from tests.security.forge import finite_block, forge
from tests.swapfs.conftest import fuse_skip_reason

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(fuse_skip_reason() is not None, reason=fuse_skip_reason() or "")]
if os.geteuid() != 0:
    pytest.skip("needs root to act as two other uids (os.setuid in forked children)",
                allow_module_level=True)

A, B = 12346, 65534
MAX_SESSIONS = 4
PROMPT = [5, 17, 42, 99, 7, 250, 3, 64, 128, 11, 12, 13, 77, 31, 45, 200, 201, 9, 8]


def _mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == os.path.realpath(path) for line in f)


@pytest.fixture(scope="module")
def env(sec_model):
    swap_dir = tempfile.mkdtemp(prefix="kvmm-sec-", dir="/var/tmp")
    mount = tempfile.mkdtemp(prefix="kvmm-secm-")
    os.chmod(mount, 0o755)
    # one block of the tiny model: 2 layers x K,V x 16 tokens x 2 heads x 16 dims x 4 bytes
    d = DaemonProcess(sec_model, args=["--socket-group", grp.getgrgid(OTHER_GID).gr_name,
                                        "--swap-dir", swap_dir, "--swap-size", "16MiB",
                                        "--mount", mount],
                      env={"KVMM_MAX_SESSIONS_PER_UID": str(MAX_SESSIONS), "KVMM_BLOCK_SIZE": "16",
                           "KVMM_MAX_REQUESTS_PER_UID": "4"})
    deadline = time.monotonic() + 20
    while not _mounted(mount) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _mounted(mount), d.log()
    yield d, mount
    try:
        with Client(d.socket, timeout=30) as c:             # alive and serving afterwards
            assert c.health()["status"] == "ok"
            assert c.generate(token_ids=PROMPT, max_tokens=3, ignore_eos=True).usage["completion_tokens"] == 3
        code = d.stop()
        log = d.log()
        assert code == 0, log
        assert "Traceback" not in log, log
    finally:
        d.cleanup()
        shutil.rmtree(swap_dir, ignore_errors=True)
        if not _mounted(mount):
            shutil.rmtree(mount, ignore_errors=True)


def as_uid(uid, fn, *args):
    return run_as(uid, OTHER_GID, fn, *args)


def _turn(sock, session, tokens, max_tokens=2):
    with Client(sock, timeout=60) as c:
        return c.generate(token_ids=tokens, session=session, max_tokens=max_tokens, ignore_eos=True).usage


def _layout_of_own_session(sock, mount, name):
    """Run a turn of `name`, then read the layout from its own export on the view."""
    _turn(sock, name, PROMPT)
    path = os.path.join(mount, "sessions", f"{os.getuid()}:{name}", "kv.bin")
    with open(path, "rb") as f:
        head = f.read(4096)
    _magic, n, _crc = struct.unpack_from("<8sII", head)
    return json.loads(head[16:16 + n])


def _meta(base: dict, tokens, nkv) -> dict:
    bs = base["layout"]["block_size"]
    return dict(base, num_tokens=len(tokens), num_kv_tokens=nkv, num_blocks=-(-nkv // bs),
                block_checksums=[], owner_uid=0, session_id="x")


def _blocks(base, n, seed=0):
    class L:                                    # what finite_block needs of a layout
        block_bytes = base["block_bytes"]
    return [finite_block(L, seed + i) for i in range(n)]


def _write_import(mount, name, data) -> int:
    """0 on success, else the errno of the failing write or close."""
    try:
        fd = os.open(os.path.join(mount, "import", name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        return exc.errno
    try:
        for off in range(0, len(data), 1 << 16):
            os.write(fd, data[off:off + (1 << 16)])
    except OSError as exc:
        try:
            os.close(fd)
        except OSError:
            pass
        return exc.errno
    try:
        os.close(fd)
    except OSError as exc:
        return exc.errno
    return 0


def test_forged_imports_are_refused_with_einval_naming_the_field(env):
    d, mount = env

    def attack(sock, mount):
        base = _layout_of_own_session(sock, mount, "own")
        vocab_edge = 320          # the tiny model's vocabulary size
        nan = bytearray(_blocks(base, 1)[0])
        nan[0:4] = struct.pack("<f", float("nan"))
        other_model = dict(base, layout=dict(base["layout"], model_id="another-model"))
        toks = PROMPT
        nkv = len(toks) - 1
        nb = -(-nkv // base["layout"]["block_size"])
        cases = {
            "negative": forge(_meta(base, toks[:3] + [-1] + toks[4:], nkv), toks[:3] + [-1] + toks[4:], _blocks(base, nb)),
            "beyond-vocab": forge(_meta(base, toks[:-1] + [vocab_edge], nkv), toks[:-1] + [vocab_edge], _blocks(base, nb)),
            "nan": forge(_meta(base, toks, nkv), toks, [bytes(nan)] + _blocks(base, nb - 1)),
            "other-model": forge(_meta(other_model, toks, nkv), toks, _blocks(base, nb)),
            "huge-count": forge(dict(_meta(base, toks, nkv), num_tokens=10**9), toks, _blocks(base, nb)),
        }
        out = {k: _write_import(mount, f"forged-{k}", v) for k, v in cases.items()}
        with Client(sock) as c:
            listed = [s["session"] for s in c.sessions()]
        return out, listed

    results, listed = as_uid(B, attack, d.socket, mount)
    assert results == {k: errno.EINVAL for k in results}, results
    assert not any(name.startswith("forged") for name in listed), listed
    log = d.log()
    for field in ("token_ids[3]", "token_ids[18]", "block 0", "layout.model_id", "num_tokens"):
        assert f"field {field}" in log, field


def test_import_is_listed_at_once_owned_and_usable_only_by_its_importer(env):
    d, mount = env
    forged_tokens = [7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15, 16, 16, 17]

    def importer(sock, mount):
        base = _layout_of_own_session(sock, mount, "own2")
        nkv = len(forged_tokens) - 1
        data = forge(_meta(base, forged_tokens, nkv), forged_tokens,
                     _blocks(base, -(-nkv // base["layout"]["block_size"]), seed=99))
        rc = _write_import(mount, "planted", data)
        with Client(sock) as c:
            listed = [s["session"] for s in c.sessions()]       # at once, no waiting
        usage = _turn(sock, "planted", [18, 19])                # its blocks now enter B's cache
        return rc, listed, usage

    rc, listed, usage = as_uid(B, importer, d.socket, mount)
    assert rc == 0 and "planted" in listed
    assert usage["cached_prompt_tokens"] > 0                    # B computes on its own import

    def victim(sock, mount):
        r = _turn(sock, None, forged_tokens + [18, 19, 20])     # same tokens as the planted KV
        with Client(sock) as c:
            try:
                c.generate(token_ids=[1, 2], session=f"{B}:planted", max_tokens=1)
                used = "used"
            except PermissionDenied:
                used = "denied"
        visible = os.listdir(os.path.join(mount, "sessions"))
        try:
            os.stat(os.path.join(mount, "sessions", f"{B}:planted"))
            stat = "visible"
        except OSError as exc:
            stat = errno.errorcode[exc.errno]
        return r["cached_prompt_tokens"], used, visible, stat

    cached, used, visible, stat = as_uid(A, victim, d.socket, mount)
    assert cached == 0                  # never the forged KV: another tenant's chain
    assert used == "denied" and stat == "ENOENT"
    assert not any(str(B) in n for n in visible), visible


def test_probing_the_prefix_cache_for_another_uids_prompt_reveals_nothing(env):
    d, _mount = env
    secret = [101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 111, 112, 113, 114, 115, 116, 117, 118]

    def send(sock):
        with Client(sock) as c:
            return c.generate(token_ids=secret, max_tokens=1).usage["cached_prompt_tokens"]

    as_uid(A, send, d.socket)
    assert as_uid(A, send, d.socket) > 0          # A's own repeat hits
    assert as_uid(B, send, d.socket) == 0         # B learns nothing


def test_another_uids_session_names_through_socket_and_view(env):
    d, mount = env
    as_uid(A, _turn, d.socket, "diary", PROMPT)

    def attack(sock, mount):
        out = {}
        with Client(sock) as c:
            for what, call in (("generate", lambda: c.generate(token_ids=[1], session=f"{A}:diary", max_tokens=1)),
                               ("delete", lambda: c.delete_session(f"{A}:diary")),
                               ("open", lambda: c.open_session(f"{A}:diary"))):
                try:
                    call()
                    out[what] = "allowed"
                except PermissionDenied:
                    out[what] = "denied"
                except InvalidRequest:           # open takes bare names only
                    out[what] = "invalid"
        sdir = os.path.join(mount, "sessions", f"{A}:diary")
        for what, call in (("listdir", lambda: os.listdir(sdir)),
                           ("read", lambda: open(os.path.join(sdir, "kv.bin"), "rb").read(10)),
                           ("rm", lambda: shutil.rmtree(sdir))):
            try:
                call()
                out[what] = "allowed"
            except OSError as exc:
                out[what] = errno.errorcode[exc.errno]
        return out

    out = as_uid(B, attack, d.socket, mount)
    assert out == {"generate": "denied", "delete": "denied", "open": "invalid",
                   "listdir": "ENOENT", "read": "ENOENT", "rm": "ENOENT"}, out
    assert as_uid(A, _turn, d.socket, "diary", [1, 2])["cached_prompt_tokens"] > 0   # intact


def test_racing_session_creation_past_the_limit(env):
    d, _mount = env

    def race(sock):
        conn = RawConn(sock)
        for i in range(3 * MAX_SESSIONS):          # pipelined: no reply awaited in between
            conn.send({"v": 1, "id": i + 1, "op": "session.open", "session": f"race{i}"})
        replies = [conn.recv() for _ in range(3 * MAX_SESSIONS)]
        conn.close()
        with Client(sock) as c:
            held = len(c.sessions())
            for s in c.sessions():
                c.delete_session(s["session"])
        return [r["type"] for r in replies], [r.get("code") for r in replies], held

    types, codes, held = as_uid(A, race, d.socket)
    assert held <= MAX_SESSIONS, (held, types)
    assert codes.count("limit_exceeded") >= 2 * MAX_SESSIONS, codes


def test_rm_r_in_the_view_deletes_in_the_engine_and_aborts_a_running_turn(env):
    d, mount = env

    def scenario(sock, mount):
        _turn(sock, "doomed", PROMPT)
        conn = RawConn(sock, timeout=60)
        conn.send({"v": 1, "id": 1, "op": "generate", "token_ids": [1, 2, 3], "session": "doomed",
                   "stream": True, "params": {"max_tokens": 400, "ignore_eos": True}})
        assert conn.recv()["type"] == "accepted"
        assert conn.recv()["type"] == "delta"             # the turn is running
        shutil.rmtree(os.path.join(mount, "sessions", f"{os.getuid()}:doomed"))
        last = conn.recv()
        while last["type"] == "delta":
            last = conn.recv()
        conn.close()
        with Client(sock) as c:
            listed = [s["session"] for s in c.sessions()]
        again = _turn(sock, "doomed", [4, 5, 6])          # starts over: no history left
        return last, listed, again

    last, listed, again = as_uid(B, scenario, d.socket, mount)
    reasons = [c["finish_reason"] for c in last.get("choices", [])]
    assert last["type"] == "error" or reasons == ["abort"], last
    assert last["type"] == "error" or len(last["choices"][0]["token_ids"]) < 400
    assert "doomed" not in listed
    assert again["prompt_tokens"] < len(PROMPT)
    as_uid(B, lambda s: Client(s).delete_session("doomed"), d.socket)


def test_filling_the_swap_area_through_import_fails_with_edquot(env):
    d, mount = env

    def flood(sock, mount):
        base = _layout_of_own_session(sock, mount, "seed")
        toks = list(range(1, 300))                        # 19 blocks each
        nkv = len(toks) - 1
        nb = -(-nkv // base["layout"]["block_size"])
        data = forge(_meta(base, toks, nkv), toks, _blocks(base, nb))
        rcs = [_write_import(mount, f"flood{i}", data) for i in range(2 * MAX_SESSIONS)]
        with Client(sock) as c:
            n = len(c.sessions())
            for s in c.sessions():
                c.delete_session(s["session"])
        return rcs, n

    rcs, n = as_uid(B, flood, d.socket, mount)
    assert n <= MAX_SESSIONS, (n, rcs)
    refused = [rc for rc in rcs if rc]
    assert refused and set(refused) <= {errno.EDQUOT, errno.ENOSPC}, rcs
    wait_idle(d.socket)
