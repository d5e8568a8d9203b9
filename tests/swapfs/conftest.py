"""Shared fixtures of the swapfs tests: a small KV layout (32 KiB blocks), a swap space in a
temporary directory on a file system with O_DIRECT, deterministic block payloads, and the
skip reasons of tests that need root, /dev/fuse or a loop device."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import zlib

import numpy as np
import pytest

from swapfs.layout import KVLayout
from swapfs.slot_store import SUPER_BYTES, slot_stride
from swapfs.swap_space import SwapSpace

LAYOUT = KVLayout(model_id="test-model", num_layers=2, block_size=16, num_kv_heads=2,
                  head_dim=64)   # 32 KiB blocks


def swap_size(num_slots: int, layout: KVLayout = LAYOUT) -> int:
    return SUPER_BYTES + num_slots * slot_stride(layout.block_bytes)


def payload(seed, layout: KVLayout = LAYOUT) -> np.ndarray:
    """Deterministic block content for any seed with a stable repr (same in every process):
    finite values of the layout's dtype, as real KV is (imports refuse NaN/Inf)."""
    rng = np.random.default_rng(zlib.crc32(repr(seed).encode()))
    if layout.dtype in ("float32", "float16"):
        n = layout.block_bytes // np.dtype(layout.dtype).itemsize
        return rng.standard_normal(n).astype(layout.dtype).view(np.uint8)
    return rng.integers(0, 256, layout.block_bytes, dtype=np.uint8)


def fuse_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return f"needs root to mount FUSE with allow_other (running as uid {os.geteuid()})"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing (no FUSE in this kernel/container)"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed (apt package fuse3)"
    return None


def loop_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root for a loop-mounted ext4 image"
    for tool in ("losetup", "mkfs.ext4", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not os.path.exists("/dev/loop-control"):
        return "/dev/loop-control is missing (no loop devices)"
    return None


needs_fuse = pytest.mark.skipif(fuse_skip_reason() is not None,
                                reason=fuse_skip_reason() or "")
needs_loop = pytest.mark.skipif(loop_skip_reason() is not None,
                                reason=loop_skip_reason() or "")


@pytest.fixture
def swap_dir():
    # /var/tmp rather than tmp_path's /tmp: /tmp may be a tmpfs, where O_DIRECT may not work
    d = tempfile.mkdtemp(prefix="kvmm-swapfs-test-", dir="/var/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def space(swap_dir):
    sp = SwapSpace(swap_dir, swap_size(32), LAYOUT, io_threads=2, calibrate=False)
    yield sp
    sp.close()


@contextlib.contextmanager
def running_faultfs(prefix: str = "kvmm-faultfs-"):
    """A fault-injecting FUSE pass-through (faultfs.py) over a directory on /var/tmp.
    Yields (mountpoint, fault(kind, on)); kinds read_eio, write_eio, write_enospc."""
    base = tempfile.mkdtemp(prefix=prefix, dir="/var/tmp")
    dirs = {k: os.path.join(base, k) for k in ("back", "mnt", "ctl")}
    for d in dirs.values():
        os.mkdir(d)
    proc = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "faultfs.py"),
                             dirs["back"], dirs["mnt"], dirs["ctl"]], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"

    def fault(kind: str, on: bool) -> None:
        path = os.path.join(dirs["ctl"], kind)
        if on:
            open(path, "w").close()
        elif os.path.exists(path):
            os.unlink(path)

    try:
        yield dirs["mnt"], fault
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        subprocess.run(["fusermount3", "-u", "-z", dirs["mnt"]], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)
