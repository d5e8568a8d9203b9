"""Which OpenMP runtime serves torch's parallel regions in a process that computes.

torch's CPU wheel brings GNU libgomp. Every parallel region ends at a barrier whose last
thread calls `futex(FUTEX_WAKE)` whether or not the other thread sleeps (libgomp
`config/linux/bar.c`): ~175 regions per decoded token give ~300 futex calls per token at
batch 1, 97 % of the daemon's user/kernel transitions (docs/trace.md). LLVM's runtime
(libomp, Debian `libomp5-14`) implements the same GOMP_* entry points and wakes only
threads that actually sleep. Loaded ahead of libgomp (LD_PRELOAD, which only works at
exec), it serves torch's calls and those of kvmm's own kernels.

Its two settings that matter on a 2-core board, chosen by measurement (docs/trace.md):
  KMP_USE_YIELD=0   spin without `sched_yield` (with yields: ~2200 syscalls per token and
                    a third of the speed);
  KMP_BLOCKTIME=1   a worker sleeps 1 ms after its last region (the default 200 ms keeps
                    a core busy long after a step; 1 ms still spans the gaps inside a step).
A user's own KMP_* values win.

`KVMM_OPENMP` chooses: `auto` (default: LLVM's when installed, else GNU's, with the reason
logged), `llvm` (required: an error if absent) or `gnu` (keep libgomp).

Invariant: the process re-executes itself at most once. Before exec it records its pid in
`KVMM_OPENMP_EXEC`; exec keeps the pid, so the new image sees its own pid there and never
execs again. After that, LD_PRELOAD is restored to what the user had, so children (a
daemon the bench starts, llama.cpp in a baseline) choose for themselves.
"""
from __future__ import annotations

import glob
import logging
import os
import sys

from kvmm_daemon.errors import KvmmError

log = logging.getLogger(__name__)

CHOICE_ENV = "KVMM_OPENMP"
EXEC_ENV = "KVMM_OPENMP_EXEC"          # "<pid>:<LD_PRELOAD before exec>"
REEXECUTED = "re-executed with LLVM libomp preloaded"
LLVM_SETTINGS = {"KMP_USE_YIELD": "0", "KMP_BLOCKTIME": "1"}
LLVM_CANDIDATES = ("/usr/lib/x86_64-linux-gnu/libomp.so.5", "/usr/lib/aarch64-linux-gnu/libomp.so.5",
                   "/usr/lib/llvm-*/lib/libomp.so.5", "/usr/local/lib/libomp.so.5")


def find_llvm_runtime() -> str | None:
    """The path of LLVM's OpenMP runtime on this machine, or None."""
    for pattern in LLVM_CANDIDATES:
        for path in sorted(glob.glob(pattern), reverse=True):
            if os.path.exists(path):
                return path
    return None


def loaded_runtimes(maps: str = "/proc/self/maps") -> set[str]:
    """Names of the OpenMP runtimes mapped into this process: subsets of {"llvm", "gnu"}."""
    try:
        with open(maps) as f:
            text = f.read()
    except OSError:
        return set()
    found = set()
    for line in text.splitlines():
        name = line.rsplit("/", 1)[-1]
        if name.startswith("libomp"):
            found.add("llvm")
        elif name.startswith("libgomp"):
            found.add("gnu")
    return found


def choice(environ: dict | None = None) -> str:
    env = os.environ if environ is None else environ
    value = env.get(CHOICE_ENV, "auto").strip().lower() or "auto"
    if value not in ("auto", "llvm", "gnu"):
        raise KvmmError(f"{CHOICE_ENV}={value!r}: expected auto, llvm or gnu")
    return value


def exec_plan(environ: dict, pid: int, llvm_path: str | None) -> tuple[dict | None, str]:
    """(the environment to re-exec with, or None to go on as is; the reason, for the log).

    Pure: everything it depends on is passed in, so each branch is testable."""
    want = choice(environ)
    marker = environ.get(EXEC_ENV, "")
    if marker.split(":", 1)[0] == str(pid):
        return None, REEXECUTED
    if want == "gnu":
        return None, f"GNU libgomp ({CHOICE_ENV}=gnu)"
    if llvm_path is None:
        if want == "llvm":
            raise KvmmError(f"{CHOICE_ENV}=llvm but LLVM's OpenMP runtime is not installed "
                            "(apt-get install libomp5-14, or run scripts/setup.sh)")
        return None, "GNU libgomp: LLVM's libomp is not installed (apt-get install libomp5-14)"
    preload = environ.get("LD_PRELOAD", "")
    if llvm_path in preload.split():
        return None, f"LLVM libomp already preloaded ({llvm_path})"
    env = dict(environ)
    env[EXEC_ENV] = f"{pid}:{preload}"
    env["LD_PRELOAD"] = f"{llvm_path} {preload}".strip()
    for key, value in LLVM_SETTINGS.items():
        env.setdefault(key, value)
    return env, f"LLVM libomp ({llvm_path}): its barriers wake only sleeping threads"


def restore_preload(environ: dict) -> None:
    """After the re-exec: LD_PRELOAD back to the user's, so children choose for themselves."""
    marker = environ.pop(EXEC_ENV, None)
    if marker is None:
        return
    before = marker.split(":", 1)[1] if ":" in marker else ""
    if before:
        environ["LD_PRELOAD"] = before
    else:
        environ.pop("LD_PRELOAD", None)


_runtime: str | None = None     # what status() found mapped; fixed once torch has loaded one
_reason = "not chosen: the process did not call openmp_runtime.ensure()"


def ensure() -> str:
    """Call first thing in a process that will compute, before torch is imported.

    May not return: re-executes the interpreter with the same arguments (`sys.orig_argv`)
    and LLVM's runtime preloaded. Returns (and keeps, for `status()`) the reason for the
    runtime in use."""
    global _reason
    llvm_path = find_llvm_runtime()
    env, reason = exec_plan(dict(os.environ), os.getpid(), llvm_path)
    if env is not None:
        if "torch" in sys.modules:
            _reason = "GNU libgomp: torch was imported before the runtime could be chosen"
            return _reason
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, list(sys.orig_argv), env)
    restore_preload(os.environ)
    if reason == REEXECUTED:
        reason = (f"LLVM libomp ({llvm_path}): its barriers wake only sleeping threads"
                  if "llvm" in loaded_runtimes() else f"GNU libgomp: preloading {llvm_path} failed")
    _reason = reason
    return reason


def status() -> dict:
    """{"runtime": what serves OpenMP here ("llvm", "gnu" or "none"), "reason": why}. Reads
    /proc/self/maps once a runtime is mapped (it stays), so call it for reports, not per step."""
    global _runtime
    if _runtime is None:
        found = describe()
        if found == "none":
            return {"runtime": found, "reason": _reason}
        _runtime = found
    return {"runtime": _runtime, "reason": _reason}


def describe() -> str:
    """What actually serves OpenMP in this process, for logs and `kvmm stats`."""
    loaded = loaded_runtimes()
    if "llvm" in loaded:
        return "llvm"
    return "gnu" if "gnu" in loaded else "none"
