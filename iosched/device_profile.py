"""DeviceProfile: how many transfers to keep in flight and how big to make them, for the
device behind a directory, measured once and kept.

`measure` writes a scratch file (O_DIRECT, so the reads that follow come from the device and
not the page cache), then for each request size in {256 KiB, 512 KiB, 1 MiB, 2 MiB} and queue
depth in {1, 2, 4, 8} reads non-adjacent ranges of it with O_DIRECT into huge-page buffers
through a preadv IOScheduler for an equal share of `seconds`, and picks the smallest
(queue depth x size) whose bandwidth is within 5% of the best: more in flight only adds
latency for the reads the forward waits on. `load_or_measure` keeps the result in
state_dir/device-profile.json keyed by the st_dev of the data directory.

Prior art: fio's bs x iodepth sweeps, PowerInfer-2's offline I/O profiling, bcache's
congestion thresholds. Left out: write profiling (writes are write-back, off the critical
path), re-measuring when the device ages.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass

from iosched.aligned_buffer import AlignedBuffer
from iosched.errors import DeviceError

log = logging.getLogger("kvmm.iosched")

SIZES = (256 << 10, 512 << 10, 1 << 20, 2 << 20)
DEPTHS = (1, 2, 4, 8)
MIN_QUEUE_DEPTH = 4   # see measure()
PROFILE_FILE = "device-profile.json"
_SCRATCH_BYTES = 64 << 20


@dataclass(frozen=True)
class DeviceProfile:
    """queue_depth: transfers in flight (> 0); request_bytes: merge limit and split size
    (a positive multiple of 4 KiB); read_bandwidth: bytes/s measured at that point (0.0 when
    not measured); measured_on: where and when it was measured ("default" when not)."""
    queue_depth: int
    request_bytes: int
    read_bandwidth: float
    measured_on: str

    def __post_init__(self) -> None:
        if self.queue_depth < 1:
            raise ValueError(f"queue_depth must be >= 1, got {self.queue_depth}")
        if self.request_bytes <= 0 or self.request_bytes % 4096:
            raise ValueError(f"request_bytes must be a positive multiple of 4096, got"
                             f" {self.request_bytes}")

    @classmethod
    def default(cls) -> DeviceProfile:
        return cls(queue_depth=8, request_bytes=1 << 20, read_bandwidth=0.0, measured_on="default")

    @classmethod
    def measure(cls, path_dir: str, *, seconds: float = 1.5) -> DeviceProfile:
        from iosched.request import Priority
        from iosched.scheduler import IOScheduler
        scratch = os.path.join(path_dir, f".iosched-profile-{os.getpid()}.tmp")
        try:
            fd = os.open(scratch, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
        except OSError as e:
            if e.errno == 22:   # EINVAL: the file system has no O_DIRECT (tmpfs, some FUSE)
                raise DeviceError(f"{path_dir} does not support O_DIRECT (tmpfs or a FUSE file"
                                  f" system?); put the data directory on the flash device's"
                                  f" file system (ext4, xfs, f2fs)") from e
            raise DeviceError(f"cannot create a scratch file in {path_dir}: {e.strerror};"
                              f" make the directory writable by the daemon") from e
        results: dict[tuple[int, int], float] = {}
        try:
            with AlignedBuffer(max(SIZES) * max(DEPTHS)) as buf:
                chunk = buf.view[:8 << 20]
                chunk[:] = os.urandom(len(chunk))  # not all zero: some devices shortcut zeros
                for off in range(0, _SCRATCH_BYTES, len(chunk)):
                    os.pwritev(fd, [chunk], off)
                os.fsync(fd)
                share = seconds / (len(SIZES) * len(DEPTHS))
                for size in SIZES:
                    for qd in DEPTHS:
                        results[(qd, size)] = _run_point(fd, buf, qd, size, share,
                                                         IOScheduler, Priority)
        finally:
            os.close(fd)
            os.unlink(scratch)
        best = max(results.values())
        qd, size = min((k for k, v in results.items() if v >= 0.95 * best),
                       key=lambda k: (k[1], k[0]))
        # a floor on the depth: the scheduler serves weights and swap at once, and a device
        # measured while busy can look as fast at depth 1, which would then serialize both
        qd = max(qd, MIN_QUEUE_DEPTH)
        st = os.stat(path_dir)
        prof = cls(queue_depth=qd, request_bytes=size, read_bandwidth=results[(qd, size)],
                   measured_on=f"{path_dir} (st_dev {st.st_dev}) at {time.strftime('%Y-%m-%dT%H:%M:%S')}")
        log.info("device profile of %s: queue depth %d x %d KiB reads, %.0f MB/s (best %.0f MB/s)",
                 path_dir, qd, size >> 10, prof.read_bandwidth / 1e6, best / 1e6)
        return prof

    @classmethod
    def load_or_measure(cls, state_dir: str, data_dir: str) -> DeviceProfile:
        path = os.path.join(state_dir, PROFILE_FILE)
        key = str(os.stat(data_dir).st_dev)
        table: dict = {}
        try:
            with open(path) as f:
                table = json.load(f)
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable %s (%s); measuring again", path, e)
        if key in table:
            try:
                return cls(**table[key])
            except (TypeError, ValueError) as e:
                log.warning("ignoring bad entry for st_dev %s in %s (%s)", key, path, e)
        prof = cls.measure(data_dir)
        table[key] = asdict(prof)
        os.makedirs(state_dir, exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(table, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return prof


def _run_point(fd, buf, qd, size, seconds, IOScheduler, Priority) -> float:
    """Read bandwidth (bytes/s) at `qd` transfers of `size` in flight for about `seconds`."""
    prof = DeviceProfile(queue_depth=qd, request_bytes=size, read_bandwidth=0.0,
                         measured_on="probe")
    slots = _SCRATCH_BYTES // size
    stride = 3 if slots % 3 else 5         # non-adjacent ranges: nothing merges
    with IOScheduler(backend="preadv", profile=prof, name="profile") as sched:
        views = [buf.view[i * size:(i + 1) * size] for i in range(qd)]
        t0 = time.monotonic()
        n = 0
        k = 0
        while time.monotonic() - t0 < seconds or n == 0:
            reqs = []
            for v in views:
                k = (k + stride) % slots
                reqs.append(sched.submit_read(fd, k * size, v, priority=Priority.WEIGHT_PREFETCH))
            for r in reqs:
                n += sched.wait(r, promote=False)
        return n / (time.monotonic() - t0)
