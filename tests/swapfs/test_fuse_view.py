"""The FUSE view on a real mount, exercised with plain os calls (and ls/df/cp)."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import psutil
import pytest
import trio

from tests.fusectl import abort_file
from tests.swapfs.conftest import LAYOUT, needs_fuse, payload, swap_size
from swapfs.export_format import MAGIC
from swapfs.fuse_mount import mount_entry
from swapfs.slot_store import HEADER_BYTES, SUPER_BYTES, slot_stride
from swapfs.swap_space import SLOT_FILE, SwapSpace

pytestmark = [pytest.mark.fuse, pytest.mark.root, needs_fuse]

BB = LAYOUT.block_bytes
ROOT_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NUM_SLOTS = 40
HEX0 = (b"\x00" * 32).hex()


def _populate(swap_dir: str) -> None:
    with SwapSpace(swap_dir, swap_size(NUM_SLOTS), LAYOUT, calibrate=False) as sp:
        sp.save_session("chat1", 0, list(range(40)), [payload(("chat1", i)) for i in range(3)])
        sp.save_session("chat2", 1000, list(range(20)), [payload(("chat2", i)) for i in range(2)])
        sp.put_prefix_blocks([(b"\x00" * 32, payload("p0")), (b"\x01" * 32, payload("p1"))])


class Mount:
    def __init__(self, swap_dir: str, mnt: str, log: str) -> None:
        self.swap_dir, self.mnt, self.log_path = swap_dir, mnt, log
        self.proc = None

    def start(self) -> None:
        self.log = open(self.log_path, "a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "swapfs.fuse_mount", "--swap-dir", self.swap_dir,
             "--mount", self.mnt, "--allow-other"],
            stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=ROOT_DIR,
            env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                [ROOT_DIR] + os.environ.get("PYTHONPATH", "").split(os.pathsep))))
        line = self.proc.stdout.readline()
        assert "mounted at" in line, open(self.log_path).read()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if mount_entry(self.mnt) is not None:
            subprocess.run(["fusermount3", "-u", "-z", self.mnt], check=False)
        self.log.close()

    def logs(self) -> str:
        return open(self.log_path).read()


@pytest.fixture(scope="module")
def mounted():
    # under /var/tmp, world-traversable: tests also look at the mount as another uid
    base = tempfile.mkdtemp(prefix="kvmm-fuse-test-", dir="/var/tmp")
    os.chmod(base, 0o755)
    swap_dir = os.path.join(base, "swap")
    _populate(swap_dir)
    m = Mount(swap_dir, os.path.join(base, "mnt"), os.path.join(base, "log"))
    m.start()
    yield m
    m.stop()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def fresh_mount(tmp_path):
    swap_dir = str(tmp_path / "swap")
    _populate(swap_dir)
    m = Mount(swap_dir, str(tmp_path / "mnt"), str(tmp_path / "log"))
    m.start()
    yield m
    m.stop()


def _p(m: Mount, *parts: str) -> str:
    return os.path.join(m.mnt, *parts)


def _errno_of(fn, *args) -> int:
    with pytest.raises(OSError) as exc:
        fn(*args)
    return exc.value.errno


def _parse_export(data: bytes):
    assert data[:8] == MAGIC
    json_len = int.from_bytes(data[8:12], "little")
    meta = json.loads(data[16:16 + json_len])
    head = -(-(16 + json_len) // 4096) * 4096
    tokens = np.frombuffer(data[head:head + 4 * meta["num_tokens"]], dtype="<i4").tolist()
    start = head + -(-4 * meta["num_tokens"] // 4096) * 4096
    blocks = [data[start + i * BB:start + (i + 1) * BB] for i in range(meta["num_blocks"])]
    assert len(data) == start + meta["num_blocks"] * BB
    return meta, tokens, blocks


def test_ls_and_metadata(mounted):
    assert sorted(os.listdir(mounted.mnt)) == ["import", "prefixes", "sessions"]
    assert sorted(os.listdir(_p(mounted, "sessions"))) == ["chat1", "chat2"]
    assert sorted(os.listdir(_p(mounted, "sessions", "chat1"))) == ["kv.bin", "meta.json"]
    meta = json.load(open(_p(mounted, "sessions", "chat1", "meta.json")))
    assert meta["token_ids"] == list(range(40)) and meta["num_blocks"] == 3
    assert meta["kv_bin_bytes"] == os.stat(_p(mounted, "sessions", "chat1", "kv.bin")).st_size
    assert os.stat(_p(mounted, "sessions", "chat2")).st_uid == 1000
    assert HEX0 in os.listdir(_p(mounted, "prefixes"))
    pmeta = json.load(open(_p(mounted, "prefixes", HEX0, "meta.json")))
    assert pmeta["block_hash"] == HEX0 and pmeta["block_bytes"] == BB
    with open(_p(mounted, "prefixes", HEX0, "kv.bin"), "rb") as f:
        assert f.read() == payload("p0").tobytes()
    out = subprocess.run(["ls", "-l", _p(mounted, "sessions", "chat1")], capture_output=True,
                         text=True, check=True).stdout
    assert "kv.bin" in out and "meta.json" in out


def test_cp_exports_the_session(mounted, tmp_path):
    dst = tmp_path / "chat1.kvmm"
    subprocess.run(["cp", _p(mounted, "sessions", "chat1", "kv.bin"), str(dst)], check=True)
    meta, tokens, blocks = _parse_export(dst.read_bytes())
    assert meta["session_id"] == "chat1" and tokens == list(range(40))
    assert all(b == payload(("chat1", i)).tobytes() for i, b in enumerate(blocks))


def test_import_restores_a_session_and_rm_r_frees_it(mounted, tmp_path):
    src = tmp_path / "chat2.kvmm"
    shutil.copyfile(_p(mounted, "sessions", "chat2", "kv.bin"), src)
    before = os.statvfs(mounted.mnt)
    subprocess.run(["cp", str(src), _p(mounted, "import", "chat2-copy")], check=True)
    assert "chat2-copy" in os.listdir(_p(mounted, "sessions"))
    assert os.listdir(_p(mounted, "import")) == []
    meta = json.load(open(_p(mounted, "sessions", "chat2-copy", "meta.json")))
    assert meta["owner_uid"] == 0 and meta["token_ids"] == list(range(20))
    _m, _t, blocks = _parse_export(open(_p(mounted, "sessions", "chat2-copy", "kv.bin"),
                                        "rb").read())
    assert all(b == payload(("chat2", i)).tobytes() for i, b in enumerate(blocks))
    mid = os.statvfs(mounted.mnt)
    assert (before.f_bfree - mid.f_bfree) * mid.f_frsize == 2 * BB
    subprocess.run(["rm", "-r", _p(mounted, "sessions", "chat2-copy")], check=True)
    assert "chat2-copy" not in os.listdir(_p(mounted, "sessions"))
    assert os.statvfs(mounted.mnt).f_bfree == before.f_bfree


def test_bad_imports_fail_and_leave_nothing(mounted, tmp_path):
    data = open(_p(mounted, "sessions", "chat1", "kv.bin"), "rb").read()
    free = os.statvfs(mounted.mnt).f_ffree
    fd = os.open(_p(mounted, "import", "short"), os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, data[:-BB])
    assert _errno_of(os.close, fd) == errno.EINVAL        # validated on close
    fd = os.open(_p(mounted, "import", "junk"), os.O_WRONLY | os.O_CREAT, 0o600)
    assert _errno_of(os.write, fd, b"this is not an export" * 100) == errno.EINVAL
    with pytest.raises(OSError):
        os.close(fd)
    assert _errno_of(os.open, _p(mounted, "import", "chat1"),
                     os.O_WRONLY | os.O_CREAT, 0o600) == errno.EEXIST
    assert not {"short", "junk"} & set(os.listdir(_p(mounted, "sessions")))
    assert os.statvfs(mounted.mnt).f_ffree == free


def test_df_shows_capacity_and_use(mounted):
    st = os.statvfs(mounted.mnt)
    assert st.f_blocks * st.f_frsize == NUM_SLOTS * BB
    assert st.f_files == NUM_SLOTS
    out = subprocess.run(["df", "-B1", mounted.mnt], capture_output=True, text=True,
                         check=True).stdout
    assert "kvmm-swapfs" in out and str(NUM_SLOTS * BB) in out


def test_nonsense_gets_clear_errnos(mounted):
    kv = _p(mounted, "sessions", "chat1", "kv.bin")
    assert _errno_of(os.open, kv, os.O_WRONLY) == errno.EROFS
    assert _errno_of(os.open, kv, os.O_RDONLY | os.O_TRUNC) == errno.EROFS
    assert _errno_of(os.truncate, kv, 0) == errno.EROFS
    assert _errno_of(os.mkdir, _p(mounted, "sessions", "new")) == errno.EPERM
    assert _errno_of(os.open, _p(mounted, "sessions", "f"), os.O_CREAT | os.O_WRONLY) == \
        errno.EPERM
    assert _errno_of(os.rename, _p(mounted, "sessions", "chat1"),
                     _p(mounted, "sessions", "chat9")) == errno.ENOTSUP
    assert _errno_of(os.rmdir, _p(mounted, "sessions", "chat1")) == errno.ENOTEMPTY
    assert _errno_of(os.chmod, kv, 0o644) == errno.EPERM
    assert _errno_of(os.symlink, "x", _p(mounted, "sessions", "l")) == errno.EPERM
    assert _errno_of(os.rmdir, _p(mounted, "sessions")) == errno.EPERM


def test_other_users_see_only_their_own_sessions(mounted):
    def as_1000(*cmd):
        return subprocess.run(list(cmd), capture_output=True, text=True, user=1000, group=1000)
    assert as_1000("ls", _p(mounted, "sessions")).stdout.split() == ["chat2"]
    assert as_1000("cat", _p(mounted, "sessions", "chat2", "meta.json")).returncode == 0
    assert as_1000("cat", _p(mounted, "sessions", "chat1", "meta.json")).returncode != 0
    assert as_1000("ls", _p(mounted, "prefixes")).returncode != 0
    assert as_1000("rm", "-r", _p(mounted, "sessions", "chat1")).returncode != 0


def test_an_open_kv_bin_is_a_stable_snapshot(mounted):
    src = _p(mounted, "sessions", "chat1", "kv.bin")
    data = open(src, "rb").read()
    subprocess.run(["cp", src, _p(mounted, "import", "snap")], check=True)
    with open(_p(mounted, "sessions", "snap", "kv.bin"), "rb") as f:
        head = f.read(4096)
        subprocess.run(["rm", "-r", _p(mounted, "sessions", "snap")], check=True)
        for i in range(3):   # reuse every free slot the deleted session may have had
            subprocess.run(["cp", src, _p(mounted, "import", f"fill{i}")], check=True)
        rest = f.read()
    _m, tokens, blocks = _parse_export(head + rest)
    assert blocks == _parse_export(data)[2] and tokens == list(range(40))
    for i in range(3):
        shutil.rmtree(_p(mounted, "sessions", f"fill{i}"))


def test_corrupt_block_reads_eio_and_the_mount_keeps_serving(fresh_mount):
    m = fresh_mount
    slot = json.load(open(_p(m, "prefixes", HEX0, "meta.json")))["slot_id"]
    with open(os.path.join(m.swap_dir, SLOT_FILE), "r+b") as f:
        f.seek(SUPER_BYTES + slot * slot_stride(BB) + HEADER_BYTES + 100)
        f.write(b"\xff\xfe")
    assert _errno_of(lambda: open(_p(m, "prefixes", HEX0, "kv.bin"), "rb").read()) == errno.EIO
    assert sorted(os.listdir(_p(m, "sessions"))) == ["chat1", "chat2"]
    assert "checksum" in m.logs()


def test_sigkill_leaves_no_mount_and_a_stale_mount_is_cleaned(fresh_mount):
    m = fresh_mount
    m.proc.kill()
    m.proc.wait()
    for _ in range(50):   # auto_unmount: the fusermount3 helper unmounts
        if mount_entry(m.mnt) is None:
            break
        time.sleep(0.1)
    assert mount_entry(m.mnt) is None
    m.start()
    helpers = [c for c in psutil.Process(m.proc.pid).children() if "fusermount" in c.name()]
    for h in helpers:    # without its helper a killed daemon leaves a dead mount behind
        h.kill()
    m.proc.kill()
    m.proc.wait()
    assert _errno_of(os.listdir, m.mnt) == errno.ENOTCONN
    m.start()
    assert sorted(os.listdir(_p(m, "sessions"))) == ["chat1", "chat2"]
    assert "cleaning the stale mount" in m.logs()


def test_connection_abort_is_survived_by_remounting(fresh_mount):
    m = fresh_mount
    with open(abort_file(m.mnt), "w") as f:
        f.write("1")
    for _ in range(100):
        try:
            if sorted(os.listdir(_p(m, "sessions"))) == ["chat1", "chat2"]:
                break
        except OSError:
            pass
        time.sleep(0.1)
    assert sorted(os.listdir(_p(m, "sessions"))) == ["chat1", "chat2"]
    assert "was aborted; remounting" in m.logs()


def test_handler_exceptions_become_eio(swap_dir):
    import pyfuse3

    from swapfs.fuse_view import SESSIONS, SwapFsOperations
    with SwapSpace(swap_dir, swap_size(4), LAYOUT, calibrate=False) as sp:
        ops = SwapFsOperations(sp)

        def broken(*_a):
            raise RuntimeError("boom")
        sp.list_sessions = broken

        async def main():
            ctx = type("Ctx", (), {"uid": 0, "gid": 0, "pid": 1, "umask": 0})()
            with pytest.raises(pyfuse3.FUSEError) as exc:
                await ops.opendir(SESSIONS, ctx)
            return exc.value.errno

        assert trio.run(main) == errno.EIO and ops.handler_errors == 1
