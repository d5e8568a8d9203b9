"""NativeLibrary: one C++ extension of kernels/csrc, built ahead of time and loaded if current.

Each library is compiled once per machine by `build()` (scripts/setup.sh calls it) with
torch.utils.cpp_extension (ninja, a C++ compiler, Python headers) and `-O3 -march=native
-fopenmp` into `<venv>/torch_extensions/<name>/` (or $TORCH_EXTENSIONS_DIR): the library
belongs to the machine that built it. Nothing is compiled at run time: `load()` returns the
built library if it exists and is newer than its source and headers, or the reason there is
none (not built, stale, or it does not load, e.g. after a torch upgrade), and the caller's
torch path serves. Used by cpu_native.py (paged attention) and q8_0.py (the LM head's Q8_0
expansion).
"""
from __future__ import annotations

import importlib.util
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

log = logging.getLogger("kvmm.kernels")

CSRC = Path(__file__).resolve().parent / "csrc"
CFLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-fopenmp")
STALE_LOCK_S = 600              # a build lock older than this was left by a killed build


@dataclass(frozen=True, slots=True)
class NativeLibrary:
    """name: the extension's module name; source: its one .cpp; headers: what it includes
    (their times count as the source's); what: how log lines name it ("native CPU kernels");
    owner: the Python module whose build() rebuilds it (named in the fix); fallback: what
    serves without it (the end of the log line)."""

    name: str
    source: Path
    headers: tuple[Path, ...]
    what: str
    owner: str
    fallback: str

    def build_directory(self) -> Path:
        """$TORCH_EXTENSIONS_DIR/<name> or <venv>/torch_extensions/<name>."""
        root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(sys.prefix, "torch_extensions")
        return Path(root) / self.name

    def library_path(self) -> Path:
        return self.build_directory() / f"{self.name}.so"

    def up_to_date(self, library: Path) -> bool:
        """The library exists and is newer than the source and every header it includes."""
        newest = max(path.stat().st_mtime for path in (self.source, *self.headers))
        return library.exists() and library.stat().st_mtime >= newest

    def build(self, *, force: bool = False, verbose: bool = False) -> Path:
        """Compiles the library for this machine unless it is newer than its source.

        Returns its path; raises what the compiler or ninja raise (ninja is required)."""
        library = self.library_path()
        if not force and self.up_to_date(library):
            return library
        from torch.utils import cpp_extension

        directory = self.build_directory()
        directory.mkdir(parents=True, exist_ok=True)
        lock = directory / "lock"
        if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            lock.unlink()                       # cpp_extension would wait on it forever
        cpp_extension.load(self.name, [str(self.source)], extra_cflags=list(CFLAGS),
                           build_directory=str(directory), verbose=verbose)
        assert self.up_to_date(library), f"the build left no library at {library}"
        return library

    def load(self) -> ModuleType | str:
        """The loaded extension, or why there is none, logged as one warning line (callers
        ask once per process)."""
        reason = self._load()
        if isinstance(reason, str):
            log.warning("%s; %s", reason, self.fallback)
        return reason

    def _load(self) -> ModuleType | str:
        library = self.library_path()
        if not library.exists():
            return f"{self.what} not built ({library} missing); run scripts/setup.sh"
        if not self.up_to_date(library):
            return (f"{self.what} out of date ({library.name} is older than {self.source.name}); "
                    f"run scripts/setup.sh")
        try:
            spec = importlib.util.spec_from_file_location(self.name, library)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        except (ImportError, OSError) as err:
            return (f"{self.what} do not load ({err}); rebuild them with "
                    f"{self.owner}.build(force=True)")
