"""uring_native: builds and loads the C io_uring binding (iosched/csrc/uring.c, linked with
liburing) as a shared library under <venv>/iosched_native/ (or $KVMM_NATIVE_DIR).

`build()` is what scripts/setup.sh runs; it skips when the library is newer than its source.
`load()` never builds: it returns the library or the reason there is none, so the scheduler
can fall back to preadv and say why.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "uring.c")
LIB_NAME = "libkvmm_uring.so"


def native_dir() -> str:
    return os.environ.get("KVMM_NATIVE_DIR") or os.path.join(sys.prefix, "iosched_native")


def library_path() -> str:
    return os.path.join(native_dir(), LIB_NAME)


def build(*, force: bool = False) -> str:
    """Compile the library if it is missing or older than its source; returns its path.
    Raises RuntimeError naming what is missing (a C compiler, liburing-dev)."""
    out = library_path()
    if not force and os.path.exists(out) and os.path.getmtime(out) >= os.path.getmtime(SOURCE):
        return out
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc/gcc) found; apt-get install gcc")
    os.makedirs(native_dir(), exist_ok=True)
    tmp = f"{out}.{os.getpid()}.tmp"
    cmd = [cc, "-O2", "-Wall", "-fPIC", "-shared", "-o", tmp, SOURCE, "-luring"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        hint = (" (liburing.h missing: apt-get install liburing-dev)"
                if "liburing.h" in proc.stderr else "")
        raise RuntimeError(f"building {out} failed{hint}: {' '.join(cmd)}\n{proc.stderr.strip()}")
    os.replace(tmp, out)
    return out


def load() -> tuple[ctypes.CDLL | None, str]:
    """(library, "") or (None, why not)."""
    path = library_path()
    if not os.path.exists(path):
        return None, f"io_uring extension not built ({path} missing); run scripts/setup.sh"
    try:
        lib = ctypes.CDLL(path)
    except OSError as e:
        return None, f"io_uring extension {path} does not load ({e}); run scripts/setup.sh"
    vp, c_int, u64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_ulonglong
    lib.kvr_open.argtypes = [ctypes.c_uint, ctypes.POINTER(c_int)]
    lib.kvr_open.restype = vp
    lib.kvr_close.argtypes = [vp]
    lib.kvr_close.restype = None
    lib.kvr_prep.argtypes = [vp, c_int, c_int, vp, ctypes.c_uint, u64, u64]
    lib.kvr_prep.restype = c_int
    lib.kvr_submit.argtypes = [vp]
    lib.kvr_submit.restype = c_int
    lib.kvr_reap.argtypes = [vp, c_int, ctypes.POINTER(u64), ctypes.POINTER(c_int), c_int,
                             ctypes.POINTER(c_int)]
    lib.kvr_reap.restype = c_int
    return lib, ""


if __name__ == "__main__":
    print(build(force="--force" in sys.argv))
