"""`kvmm serve --swap-dir D --mount M`: the daemon mounts the swapfs view in its own trio
loop; a session turn made through the socket shows up on the mount, `df` shows the swap
capacity, `rm -r` drops the session, SIGTERM unmounts."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time

import pytest

from kvmm_daemon.client import Client
from tests.daemon.conftest import DaemonProcess
from tests.swapfs.conftest import fuse_skip_reason

pytestmark = pytest.mark.skipif(fuse_skip_reason() is not None, reason=fuse_skip_reason() or "")


def _is_mounted(path: str) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == real for line in f)


def test_session_visible_on_daemon_mount(tiny_model):
    swap_dir = tempfile.mkdtemp(prefix="kvmm-d-", dir="/var/tmp")
    mount = tempfile.mkdtemp(prefix="kvmm-m-")
    d = DaemonProcess(tiny_model, args=["--socket-group", "", "--swap-dir", swap_dir, "--swap-size", "16MiB",
                                        "--mount", mount])
    try:
        deadline = time.monotonic() + 20
        while not _is_mounted(mount) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _is_mounted(mount), d.log()
        with Client(d.socket, timeout=30) as c:
            r = c.generate(token_ids=[5, 17, 42, 99, 7, 250, 3, 64, 128, 11, 12, 13, 77, 31, 45, 200, 201],
                           session="notes", max_tokens=4, ignore_eos=True)
            assert r.usage["completion_tokens"] == 4
        names = os.listdir(os.path.join(mount, "sessions"))
        assert len(names) == 1 and names[0].endswith("notes"), names
        sdir = os.path.join(mount, "sessions", names[0])
        meta = json.loads(open(os.path.join(sdir, "meta.json")).read())
        assert len(meta["token_ids"]) == 17 + 4
        assert os.path.getsize(os.path.join(sdir, "kv.bin")) > 0
        st = os.statvfs(mount)
        assert st.f_blocks > 0 and st.f_bfree < st.f_blocks
        shutil.rmtree(sdir)
        assert os.listdir(os.path.join(mount, "sessions")) == []
        # a forced unmount takes the view away, not the service
        subprocess.run(["umount", "-l", mount], check=True)
        with Client(d.socket, timeout=30) as c:
            r = c.generate(token_ids=[5, 17, 42], session="notes", max_tokens=3, ignore_eos=True)
            assert r.usage["completion_tokens"] == 3
            assert c.health()
        assert d.stop() == 0, d.log()
        assert not _is_mounted(mount)
        assert "Traceback" not in d.log(), d.log()
    finally:
        d.cleanup()
        shutil.rmtree(swap_dir, ignore_errors=True)
        if not _is_mounted(mount):
            shutil.rmtree(mount, ignore_errors=True)
