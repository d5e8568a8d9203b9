"""The FUSE connection-control file system (fusectl), for tests that abort a connection.

A fresh machine may not have /sys/fs/fuse/connections mounted (setup mounts it; this helper
mounts it too, so no test depends on another having done so) and skips with the reason when
it cannot be had.
"""
from __future__ import annotations

import os
import subprocess

import pytest

FUSECTL = "/sys/fs/fuse/connections"


def abort_file(mountpoint: str) -> str:
    """Path of the `abort` control file of the FUSE connection behind `mountpoint`."""
    if not os.path.ismount(FUSECTL):
        done = subprocess.run(["mount", "-t", "fusectl", "fusectl", FUSECTL],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"fusectl is not mounted at {FUSECTL} and mounting it failed: "
                        f"{done.stderr.strip() or done.returncode}")
    path = os.path.join(FUSECTL, str(os.minor(os.stat(mountpoint).st_dev)), "abort")
    if not os.path.exists(path):
        pytest.skip(f"{path} is missing: this kernel's fusectl does not list the connection")
    return path
