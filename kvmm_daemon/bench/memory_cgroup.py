"""MemoryCgroup: run a process under a memory limit (cgroup v1 or v2), for benchmarks that
compare engines given the same bytes.

v1 (`/sys/fs/cgroup/memory`, as on this project's machines): a child group with
`memory.limit_in_bytes`; peak from `memory.max_usage_in_bytes`; OOM kills from
`memory.oom_control`. v2 (unified `/sys/fs/cgroup`): `memory.max` (and `memory.swap.max` 0),
peak from `memory.peak` where the kernel has it, OOM kills from `memory.events`. The page
cache a process reads through counts against the limit in both, which is the point: an mmap
engine gets exactly the bytes it is given.

The child is placed in the group by the child itself before it execs (a preexec function
writes its pid to cgroup.procs), so no instruction of it runs outside the limit. The group
is named after the benchmark's pid (another run's group is never touched), removed on exit,
and a leftover of the same name (a killed run whose pid came round again) is removed first.
"""
from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from kvmm_daemon.errors import ConfigError

ROOT = Path("/sys/fs/cgroup")


def cgroup_version(root: Path = ROOT) -> int:
    """2 for a unified hierarchy with the memory controller, 1 for a v1 memory hierarchy."""
    if (root / "cgroup.controllers").exists() and "memory" in (root / "cgroup.controllers").read_text().split():
        return 2
    if (root / "memory" / "memory.limit_in_bytes").exists():
        return 1
    raise ConfigError(f"no memory cgroup under {root} (neither v2 with the memory controller nor v1 "
                      f"memory/); mount one to run memory-limited benchmarks")


@dataclass(frozen=True, slots=True)
class CgroupRun:
    returncode: int
    stdout: str
    stderr: str
    peak_bytes: int | None      # the group's peak usage (None where the kernel does not say)
    oom_kills: int
    seconds: float

    @property
    def oom_killed(self) -> bool:
        return self.oom_kills > 0 or self.returncode == -9


class MemoryCgroup:
    """Attributes: path (the group's directory), limit (bytes), version (1 or 2).
    Invariant: the directory exists between __enter__ and __exit__ and holds no process after."""

    def __init__(self, name: str, limit: int, *, root: Path = ROOT) -> None:
        if os.geteuid() != 0:
            raise ConfigError("memory-limited benchmarks need root (they create cgroups)")
        name = f"{name}-{os.getpid()}"       # two benchmarks on one machine never share a group
        self.version = cgroup_version(root)
        self.path = (root / "memory" / name) if self.version == 1 else (root / name)
        self.limit = int(limit)
        self._root = root

    def __enter__(self) -> MemoryCgroup:
        self._remove()
        if self.version == 2:
            ctl = self._root / "cgroup.subtree_control"
            if "memory" not in ctl.read_text().split():
                ctl.write_text("+memory")
        self.path.mkdir()
        if self.version == 1:
            self._write("memory.limit_in_bytes", self.limit)
            for name, value in (("memory.swappiness", 0), ("memory.memsw.limit_in_bytes", self.limit)):
                try:
                    self._write(name, value)
                except OSError:
                    pass            # swap accounting off: no swap on these machines anyway
        else:
            self._write("memory.max", self.limit)
            try:
                self._write("memory.swap.max", 0)
            except OSError:
                pass
        return self

    def __exit__(self, *exc) -> None:
        self._remove()

    def _write(self, name: str, value) -> None:
        (self.path / name).write_text(str(value))

    def _read(self, name: str) -> str | None:
        try:
            return (self.path / name).read_text()
        except OSError:
            return None

    def _remove(self) -> None:
        if not self.path.exists():
            return
        procs = self._read("cgroup.procs") or ""
        for pid in procs.split():
            try:
                os.kill(int(pid), 9)
            except ProcessLookupError:
                pass
        for _ in range(100):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.05)
        raise ConfigError(f"cannot remove cgroup {self.path}; remove it by hand (rmdir)")

    def peak(self) -> int | None:
        raw = self._read("memory.max_usage_in_bytes" if self.version == 1 else "memory.peak")
        return int(raw) if raw and raw.strip().isdigit() else None

    def oom_kills(self) -> int:
        if self.version == 1:
            for line in (self._read("memory.oom_control") or "").splitlines():
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
            return 0
        for line in (self._read("memory.events") or "").splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return 0

    def run(self, cmd: list[str], *, timeout: float | None = None, env: dict | None = None) -> CgroupRun:
        """Run `cmd` inside the group to completion (killed at `timeout`)."""
        procs = str(self.path / "cgroup.procs")

        def enter() -> None:                 # runs in the child, before exec
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=enter, env=env)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        return CgroupRun(proc.returncode, out, err, self.peak(), self.oom_kills(), time.perf_counter() - t0)


def cached_bytes(path: str) -> int:
    """Bytes of `path` in the page cache (mincore over a fresh read-only mapping), to check
    that a drop left the file cold: pages mapped by other processes cannot be dropped."""
    import ctypes
    import mmap

    size = os.path.getsize(path)
    if not size:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                          ctypes.c_long]
    pages = -(-size // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    with open(path, "rb") as f:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            return -1
        try:
            if libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) != 0:
                return -1
        finally:
            libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(size))
    return sum(v & 1 for v in vec) * mmap.PAGESIZE


def drop_page_cache() -> None:
    """Write back and drop the page cache, so a benchmark starts with no file cached."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
    except OSError as e:
        raise ConfigError(f"cannot drop the page cache ({e.strerror}); run the benchmark as root") from None
