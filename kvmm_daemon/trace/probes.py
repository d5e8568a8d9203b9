"""Feature detection, compiling and attaching the probes, and reading their maps.

What BPF tracing needs, each checked on its own so the message names exactly what is
missing: root (or CAP_BPF + CAP_PERFMON), the bcc module, kernel headers for bcc's clang
(/lib/modules/$(uname -r)/build, $BCC_KERNEL_SOURCE or the kheaders module), and tracefs.
As root, a tracefs that nothing mounted is mounted at /sys/kernel/tracing (what systemd's
sys-kernel-tracing.mount does at boot). Then every probe's tracepoints are checked, in
tracefs and with bcc's `BPF.tracepoint_exists`, and a probe whose tracepoints are missing or
whose C fails to compile is dropped with a note while the others run (bcc tools degrade the
same way, e.g. biolatency choosing among block tracepoints).

Prior art: bcc tools/biolatency.py and syscount.py (tracepoint_exists probes, BPF(text=...),
table reads). Left out: kprobe fallbacks (this kernel family has none) and BTF raw
tracepoints (bcc's TRACEPOINT_PROBE args are enough at these event rates).
"""
from __future__ import annotations

import ctypes
import importlib
import os
import platform
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Sequence

from kvmm_daemon.trace.counters import BpfCounters
from kvmm_daemon.trace.file_extents import Extent, file_extents
from kvmm_daemon.trace.programs import (CHILDREN_TRACEPOINTS, FILE_KINDS, FUSE_ROLES, HISTS,
                                        MAX_FILE_EXTENTS, PROBES, TOTALS, build_program)

TRACEFS_MOUNTPOINT = "/sys/kernel/tracing"
CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 21, 38, 39


def find_tracefs(mounts: str) -> str | None:
    """The tracefs directory from /proc/mounts text (tracefs itself, or debugfs/tracing)."""
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "tracefs":
            return fields[1]
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "debugfs" and os.path.isdir(f"{fields[1]}/tracing/events"):
            return f"{fields[1]}/tracing"
    return None


def bpf_capable(cap_eff: int) -> bool:
    """Loading tracing programs needs CAP_SYS_ADMIN, or CAP_BPF with CAP_PERFMON (root has all)."""
    has = lambda cap: bool(cap_eff >> cap & 1)
    return has(CAP_SYS_ADMIN) or (has(CAP_BPF) and has(CAP_PERFMON))


def _cap_eff() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def find_kernel_headers(release: str) -> tuple[str | None, str]:
    """(directory bcc will use or None, what was tried) for kernel `release`."""
    candidates = [os.environ.get("BCC_KERNEL_SOURCE"), f"/lib/modules/{release}/build",
                  f"/lib/modules/{release}/source"]
    tried = []
    for path in filter(None, candidates):
        if os.path.isdir(os.path.join(path, "include")):
            return path, ""
        tried.append(f"{path} ({'dangling link' if os.path.islink(path) else 'no include/'})"
                     if os.path.lexists(path) else f"{path} (absent)")
    if os.path.exists("/sys/kernel/kheaders.tar.xz"):
        return "/sys/kernel/kheaders.tar.xz", ""
    return None, ", ".join(tried)


@dataclass(frozen=True, slots=True)
class Environment:
    """What this machine offers for BPF tracing; `missing()` names what it lacks."""
    euid: int
    capable: bool
    bcc_error: str | None
    headers: str | None
    headers_tried: str
    tracefs: str | None
    release: str
    notes: tuple[str, ...] = ()

    def missing(self) -> list[str]:
        out = []
        if not self.capable:
            who = "root without capabilities" if self.euid == 0 else f"not root (euid {self.euid})"
            out.append(f"no BPF privileges: {who}, neither CAP_SYS_ADMIN nor CAP_BPF+CAP_PERFMON; "
                       "run kvmm trace as root (sudo)")
        if self.bcc_error:
            out.append(f"bcc is not importable ({self.bcc_error}): apt install python3-bpfcc, then "
                       "scripts/setup.sh links it into the venv")
        if self.headers is None:
            out.append(f"no kernel headers for {self.release}: tried {self.headers_tried}; run scripts/setup.sh "
                       f"or apt install linux-headers-{self.release}, or set BCC_KERNEL_SOURCE")
        if self.tracefs is None:
            out.append(f"tracefs is not mounted: mount -t tracefs nodev {TRACEFS_MOUNTPOINT} (as root)")
        return out


def _mount_tracefs() -> str | None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"nodev", TRACEFS_MOUNTPOINT.encode(), b"tracefs", 0, None) != 0:
        return None
    return TRACEFS_MOUNTPOINT


def detect_environment(*, mount_tracefs: bool = True) -> Environment:
    euid, notes = os.geteuid(), []
    try:
        importlib.import_module("bcc")
        bcc_error = None
    except Exception as exc:  # ImportError, or libbcc failing to load
        bcc_error = f"{type(exc).__name__}: {exc}"
    release = platform.release()
    headers, tried = find_kernel_headers(release)
    with open("/proc/mounts") as f:
        tracefs = find_tracefs(f.read())
    if tracefs is None and euid == 0 and mount_tracefs and (tracefs := _mount_tracefs()):
        notes.append(f"mounted tracefs at {tracefs}")
    return Environment(euid, bpf_capable(_cap_eff()), bcc_error, headers, tried, tracefs, release,
                       tuple(notes))


def tracepoint_exists(tracefs: str, tracepoint: str) -> bool:
    category, _, event = tracepoint.partition(":")
    return os.path.isdir(os.path.join(tracefs, "events", category, event))


@dataclass(frozen=True, slots=True)
class Selection:
    """The probes to build: `enabled` in PROBES order; `notes` say what was dropped and why."""
    enabled: tuple[str, ...]
    bio_queue: bool
    follow_children: bool
    notes: tuple[str, ...] = ()


def select_probes(requested: Sequence[str], exists: Callable[[str], bool], *,
                  follow_children: bool = False) -> Selection:
    enabled, notes = [], []
    for name in PROBES:
        if name not in requested:
            continue
        lacking = [tp for tp in PROBES[name].required if not exists(tp)]
        if lacking:
            notes.append(f"{name}: tracepoint {', '.join(lacking)} missing; {PROBES[name].summary} not traced")
        else:
            enabled.append(name)
    bio_queue = "block" in enabled and exists("block:block_bio_queue")
    if "block" in enabled and not bio_queue:
        notes.append("block: tracepoint block:block_bio_queue missing; only requests the target issues "
                     "itself are counted")
    if follow_children and not all(map(exists, CHILDREN_TRACEPOINTS)):
        notes.append(f"children: tracepoint {' or '.join(CHILDREN_TRACEPOINTS)} missing; only the given "
                     "processes are traced")
        follow_children = False
    return Selection(tuple(enabled), bio_queue, follow_children, tuple(notes))


def _compile(text: str):
    """BPF(text) with clang's stderr captured: (bpf, None) or (None, first error line)."""
    from bcc import BPF
    with tempfile.TemporaryFile() as err:
        saved = os.dup(2)
        os.dup2(err.fileno(), 2)
        try:
            return BPF(text=text.encode()), None
        except Exception as exc:
            failure = str(exc)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        err.seek(0)
        lines = err.read().decode(errors="replace").splitlines()
    errors = [line.split("error: ", 1)[1] for line in lines if "error: " in line]
    return None, (errors[0] if errors else failure)


@dataclass
class BpfSession:
    """The loaded programs, attached from construction until close().

    Attributes:
      selection: what was built; `enabled` lists only probes that compiled.
      notes: selection notes plus one per probe dropped at compile time.
      text: the C text loaded.
      files: kind (of FILE_KINDS) -> path, for each file whose extents are in `file_ext`.
    Invariant: `bpf` is not None until close(); every table read belongs to an enabled probe.
    """
    selection: Selection
    bpf: object
    text: str
    notes: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)

    @classmethod
    def open(cls, selection: Selection) -> BpfSession:
        """Compile and attach; probes failing to compile alone are dropped with a note."""
        from bcc import BPF
        notes = list(selection.notes)
        visible = [p for p in selection.enabled
                   if all(BPF.tracepoint_exists(*tp.split(":")) for tp in PROBES[p].required)]
        notes += [f"{p}: bcc does not see its tracepoints; not traced" for p in selection.enabled if p not in visible]
        if not visible:
            raise RuntimeError("bcc sees none of the probes' tracepoints (is its tracefs path mounted?)")
        build = lambda probes: build_program(probes, follow_children=selection.follow_children,
                                             bio_queue=selection.bio_queue)
        bpf, error = _compile(build(visible))
        if bpf is None:
            kept = []
            for p in visible:
                one, err = _compile(build([p]))
                if one is None:
                    notes.append(f"{p}: BPF program does not compile ({err}); not traced")
                else:
                    one.cleanup()
                    kept.append(p)
            if not kept:
                raise RuntimeError(f"no probe compiles: {error}")
            visible = kept
            bpf, error = _compile(build(visible))
            if bpf is None:
                raise RuntimeError(f"probes compile alone but not together: {error}")
        sel = Selection(tuple(visible), selection.bio_queue, selection.follow_children, selection.notes)
        return cls(sel, bpf, build(visible), notes)

    def add_target(self, pid: int) -> None:
        assert self.bpf is not None, "session closed"
        table = self.bpf[b"targets"]
        table[table.Key(pid)] = table.Leaf(1)

    def set_files(self, paths: dict[str, str | None]) -> list[str]:
        """Attribute block requests to these files (kind of FILE_KINDS -> path; None: no such
        file) by their extents; returns a note for each file that cannot be attributed."""
        assert self.bpf is not None, "session closed"
        if "block" not in self.selection.enabled:
            return []
        notes, entries = [], []
        for kind in FILE_KINDS:
            path = paths.get(kind)
            if not path:
                continue
            try:
                extents = file_extents(path)
            except ValueError as exc:
                notes.append(f"block: {kind} file not attributed: {exc}")
                continue
            room = MAX_FILE_EXTENTS - 1 - len(entries)        # one entry ends the list
            if len(extents) > room:
                notes.append(f"block: {kind} file {path} has {len(extents)} extents; only the first {room} "
                             f"are attributed (defragment it, e.g. e4defrag)")
                extents = extents[:room]
            entries += [(FILE_KINDS.index(kind) + 1, e) for e in extents]
            self.files[kind] = path
        table = self.bpf[b"file_ext"]
        for i, (file, e) in enumerate(entries + [(0, Extent(0, 0, 0))]):
            table[table.Key(i)] = table.Leaf(e.dev, e.start, e.end, file, 0)
        return notes

    def read(self) -> BpfCounters:
        """A snapshot of the cumulative maps."""
        assert self.bpf is not None, "session closed"
        b, enabled = self.bpf, self.selection.enabled
        totals = {TOTALS[k.value]: int(sum(v)) for k, v in b[b"totals"].items()}
        hists: dict[str, dict[int, int]] = {}
        for k, v in b[b"hist"].items():
            hists.setdefault(HISTS[k.kind], {})[k.slot] = v.value
        op = lambda v: (v.count, v.ns, v.errors)
        syscalls = {k.value: op(v) for k, v in b[b"sys_stats"].items()} if "syscalls" in enabled else {}
        fuse = ({(k.opcode, FUSE_ROLES[k.role]): op(v) for k, v in b[b"fuse_stats"].items()}
                if "fuse" in enabled else {})
        uring = {k.value: op(v) for k, v in b[b"uring_stats"].items()} if "io_uring" in enabled else {}
        return BpfCounters(totals=totals, hists=hists, syscalls=syscalls, fuse=fuse, io_uring=uring)

    def close(self) -> None:
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None
