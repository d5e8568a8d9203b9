"""Shared fixtures of the iosched tests: a data file opened with O_DIRECT in a directory on the
real disk (/var/tmp: /tmp may be a tmpfs, which has no O_DIRECT), and a scheduler per backend
(io_uring skipped with the reason when its native library is not built)."""
from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import pytest

from iosched import AlignedBuffer, DeviceProfile, IOScheduler

FILE_BYTES = 8 << 20


def uring_skip_reason() -> str | None:
    from iosched import uring_backend
    backend, why = uring_backend.UringBackend.create(1)
    if backend is None:
        return why
    backend.stop()
    return None


BACKENDS = ["preadv", pytest.param("io_uring", marks=pytest.mark.skipif(
    uring_skip_reason() is not None, reason=uring_skip_reason() or ""))]


@pytest.fixture
def data_dir():
    d = tempfile.mkdtemp(prefix="kvmm-iosched-test-", dir="/var/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def data(data_dir):
    """(path, content, fd): an 8 MiB file of random bytes, opened O_RDWR | O_DIRECT."""
    path = os.path.join(data_dir, "data.bin")
    content = np.random.default_rng(7).integers(0, 256, FILE_BYTES, dtype=np.uint8).tobytes()
    with open(path, "wb") as f:
        f.write(content)
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    yield path, content, fd
    os.close(fd)


@pytest.fixture
def buf():
    with AlignedBuffer(FILE_BYTES) as b:
        yield b


def make(backend: str, *, qd: int = 4, request_bytes: int = 1 << 20, retries: int = 2):
    prof = DeviceProfile(queue_depth=qd, request_bytes=request_bytes, read_bandwidth=0.0,
                         measured_on="test")
    return IOScheduler(backend=backend, profile=prof, retries=retries, name="test")
