"""Faults of the device under the swap space: EIO and ENOSPC reach the caller as typed
errors, are counted and logged once, lose nothing committed, and pass when the fault does.

EIO: this kernel has no device-mapper error/flakey targets, so the slot file sits on
faultfs (tests/swapfs/faultfs.py), a pass-through FUSE file system that fails reads or
writes on demand; the slot file is opened O_DIRECT and served direct_io, so no page cache
retry hides a failure. ENOSPC: a loop-mounted ext4 image filled up (real O_DIRECT + ENOSPC).
"""
import logging
import os
import shutil
import subprocess
import tempfile

import numpy as np
import pytest

from tests.swapfs.conftest import LAYOUT, needs_fuse, needs_loop, payload, running_faultfs, swap_size
from swapfs.errors import SwapIOError, SwapNoSpaceError
from swapfs.swap_space import SwapSpace

HERE = os.path.dirname(os.path.abspath(__file__))
BB = LAYOUT.block_bytes


@pytest.fixture
def faultfs():
    with running_faultfs("kvmm-faultfs-") as fs:
        yield fs


@pytest.fixture
def small_ext4():
    base = tempfile.mkdtemp(prefix="kvmm-ext4-", dir="/var/tmp")
    img, mnt = os.path.join(base, "fs.img"), os.path.join(base, "mnt")
    os.mkdir(mnt)
    with open(img, "wb") as f:
        f.truncate(24 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", img], check=True, capture_output=True)
    subprocess.run(["mount", "-o", "loop", img, mnt], check=True)
    yield mnt
    subprocess.run(["umount", mnt], check=False)
    shutil.rmtree(base, ignore_errors=True)


def _fill(path: str) -> None:
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError:
            pass
        try:
            for _ in range(4096):
                f.write(b"\0" * 4096)
                f.flush()
        except OSError:
            pass


def _zeros(n):
    return [np.zeros(BB, np.uint8) for _ in range(n)]


@pytest.mark.fuse
@needs_fuse
def test_eio_on_reads_and_writes_is_typed_counted_and_logged_once(faultfs, caplog):
    mnt, fault = faultfs
    with SwapSpace(mnt, swap_size(24), LAYOUT, io_threads=2, calibrate=False) as sp:
        assert sp.statistics().direct_io
        sp.save_session("s", 0, list(range(48)), [payload(i) for i in range(3)])
        sp.put_prefix_blocks([(b"p" * 32, payload("p"))])
        handles = sp.swap_out([payload("x")])
        caplog.set_level(logging.ERROR, logger="kvmm.swapfs")
        fault("read_eio", True)
        with pytest.raises(SwapIOError) as exc:
            sp.load_session("s", _zeros(3))
        assert exc.value.blocks_loaded == 0
        with pytest.raises(SwapIOError):
            sp.swap_in(handles, _zeros(1))
        assert sp.get_prefix_blocks([b"p" * 32], _zeros(1)) == 0       # a miss, counted
        fault("read_eio", False)
        fault("write_eio", True)
        free = sp.statistics().free_slots
        with pytest.raises(SwapIOError):
            sp.swap_out([payload("y")])
        with pytest.raises(SwapIOError):
            sp.save_session("s", 0, list(range(64)), [payload(i) for i in range(4)])
        assert sp.statistics().free_slots == free                      # nothing leaked
        fault("write_eio", False)
        st = sp.statistics()
        assert st.errors["eio"] == 5
        assert sum("errno 5" in r.message for r in caplog.records) == 1   # logged once
        out = _zeros(3)
        info = sp.load_session("s", out)          # the committed version, untouched
        assert info.num_blocks == 3 and all((out[i] == payload(i)).all() for i in range(3))
        assert sp.get_prefix_block(b"p" * 32, out[0])
        sp.save_session("s", 0, list(range(64)), [payload(i) for i in range(4)])


@pytest.mark.fuse
@needs_fuse
def test_enospc_from_slot_writes(faultfs):
    mnt, fault = faultfs
    with SwapSpace(mnt, swap_size(8), LAYOUT, io_threads=2, calibrate=False) as sp:
        fault("write_enospc", True)
        with pytest.raises(SwapNoSpaceError, match="free space"):
            sp.swap_out([payload(1)])
        fault("write_enospc", False)
        assert sp.statistics().errors["enospc"] == 1
        assert len(sp.swap_out([payload(1)])) == 1


@pytest.mark.root
@needs_loop
def test_swap_size_beyond_the_file_system(small_ext4):
    with pytest.raises(SwapNoSpaceError, match="lower --swap-size"):
        SwapSpace(small_ext4, 64 << 20, LAYOUT, calibrate=False)


@pytest.mark.root
@needs_loop
def test_full_file_system_fails_commits_without_losing_anything(small_ext4):
    sp = SwapSpace(small_ext4, swap_size(64), LAYOUT, io_threads=2, calibrate=False)
    try:
        sp.save_session("keep", 0, list(range(32)), [payload(0), payload(1)])
        filler = os.path.join(small_ext4, "filler")
        _fill(filler)
        history = list(range(30000))           # a long history: ~30 SQLite pages per save
        with pytest.raises(SwapNoSpaceError):
            for i in range(200):
                sp.save_session(f"s{i}", 0, history, [payload(i)], num_kv_tokens=16)
        st = sp.statistics()
        assert st.errors["enospc"] == 1
        assert st.session_slots == st.sessions + 1     # no staged slot leaked
        out = _zeros(2)
        sp.load_session("keep", out)
        assert (out[1] == payload(1)).all()
        os.unlink(filler)
        sp.save_session("after", 0, history, [payload("a")], num_kv_tokens=16)
    finally:
        sp.close()
    with SwapSpace(small_ext4, swap_size(64), LAYOUT, calibrate=False) as sp:
        assert {"keep", "after"} <= {s.session_id for s in sp.list_sessions()}
