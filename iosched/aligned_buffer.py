"""O_DIRECT-capable memory: huge-page backed anonymous buffers, and byte views of the
engine's buffers with their addresses.

O_DIRECT needs buffer addresses and lengths aligned to the device's logical block (4 KiB is
safe everywhere). Beyond alignment, speed depends on the pages behind the buffer: the kernel
builds one bio segment per physical page, so a buffer of 4 KiB pages caps a virtio disk near
0.9 GB/s, while 2 MiB transparent huge pages let one segment cover a whole request.
`AlignedBuffer` therefore maps MAP_PRIVATE|MAP_ANONYMOUS memory (Python's default
`mmap.mmap(-1, n)` is MAP_SHARED, i.e. shmem, which gets no anonymous THP), in 2 MiB multiples
at a 2 MiB-aligned address, asks for huge pages with madvise(MADV_HUGEPAGE) and faults them in.

Prior art: the huge-page arena of llama.cpp's mmap loader, PyTorch's THP_MEM_ALLOC_ENABLE.
`lock()` pins the buffer with mlock2(MLOCK_ONFAULT) (plain mlock where mlock2 is missing), so
weights and KV never go to swap; the caller decides whether its budget allows it.
Left out: hugetlbfs (needs reserved pages).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import sys
from typing import Any

import numpy as np

ALIGN = 4096                 # O_DIRECT alignment of addresses, lengths and file offsets
HUGE_PAGE = 2 * 1024 * 1024  # x86-64 / arm64 (4 KiB base pages) PMD size
_MADV_POPULATE_WRITE = 23    # Linux >= 5.14; not exported by Python's mmap module
_MLOCK_ONFAULT = 1
_libc = None


def _memlock_limits() -> str:
    """RLIMIT_MEMLOCK as "soft S, hard H" in readable sizes, for error messages."""
    import resource

    def size(v: int) -> str:
        if v == resource.RLIM_INFINITY:
            return "unlimited"
        return f"{v / 2**20:g} MiB" if v >= 2**20 else f"{v / 2**10:g} KiB"

    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return f"soft {size(soft)}, hard {size(hard)}"


def _c_library() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


def round_up(n: int, align: int) -> int:
    return -(-n // align) * align


class AlignedBuffer:
    """An anonymous, 2 MiB-aligned, preferably huge-page backed byte buffer (with
    huge_pages=False: 4 KiB-aligned and -rounded, for small scratch such as slot headers).

    Attributes:
      nbytes: usable length, a multiple of 2 MiB (4 KiB) >= the requested size.
      view: writable 1-D uint8 memoryview of exactly `nbytes`, starting at `address`.
      address: virtual address of view[0]; a multiple of HUGE_PAGE (ALIGN).
      huge_pages_requested: madvise(MADV_HUGEPAGE) succeeded (the kernel may still fall back
        to 4 KiB pages under fragmentation; `huge_page_bytes()` tells what it got).
      locked: lock() succeeded (the range is mlocked until the mapping goes).
      lock_error: why the last lock() was refused (naming the limit to raise), else None.
    Invariant: `view` is valid until `close()`; after it, `view` is None (views, slices and
    tensors taken from it stay valid as long as they live).
    """

    def __init__(self, nbytes: int, *, huge_pages: bool = True, populate: bool = True) -> None:
        if nbytes <= 0:
            raise ValueError(f"AlignedBuffer size must be positive, got {nbytes}")
        align = HUGE_PAGE if huge_pages else ALIGN
        self.nbytes = round_up(nbytes, align)
        self._map = mmap.mmap(-1, self.nbytes + (align if huge_pages else 0),
                              flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                              prot=mmap.PROT_READ | mmap.PROT_WRITE)
        base = _address_of_writable(self._map)
        offset = (-base) % align
        self.address = base + offset
        self.huge_pages_requested = False
        self.locked = False
        self.lock_error: str | None = None
        if huge_pages and hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                self._map.madvise(mmap.MADV_HUGEPAGE, offset, self.nbytes)
                self.huge_pages_requested = True
            except OSError:
                pass  # THP disabled ("never") or unsupported: plain pages still work
        self.view: memoryview | None = memoryview(self._map)[offset:offset + self.nbytes]
        if populate:
            self._populate(offset)

    def _populate(self, offset: int) -> None:
        try:
            self._map.madvise(_MADV_POPULATE_WRITE, offset, self.nbytes)
        except OSError:
            step = HUGE_PAGE if self.huge_pages_requested else mmap.PAGESIZE
            view = self.view
            for i in range(0, self.nbytes, step):
                view[i] = 0

    def lock(self, onfault: bool = True) -> bool:
        """Pin the buffer in RAM: mlock2(MLOCK_ONFAULT) when `onfault` (pages lock as they are
        touched), else (or where mlock2 is missing) mlock. Returns False and sets `lock_error`
        when the kernel refuses (RLIMIT_MEMLOCK too low, no CAP_IPC_LOCK)."""
        if self.view is None:
            raise ValueError("lock() on a closed AlignedBuffer")
        libc = _c_library()
        addr, n = ctypes.c_void_p(self.address), ctypes.c_size_t(self.nbytes)
        rc, err = -1, errno.ENOSYS
        if onfault and hasattr(libc, "mlock2"):
            rc = libc.mlock2(addr, n, ctypes.c_int(_MLOCK_ONFAULT))
            err = ctypes.get_errno() if rc != 0 else 0
        if rc != 0 and err in (errno.ENOSYS, errno.EINVAL):
            rc = libc.mlock(addr, n)
            err = ctypes.get_errno() if rc != 0 else 0
        if rc == 0:
            self.locked, self.lock_error = True, None
            return True
        self.lock_error = (f"mlock of {self.nbytes} bytes refused: {os.strerror(err)} (locked-memory"
                           f" limit {_memlock_limits()}); raise the locked-memory limit (systemd:"
                           f" LimitMEMLOCK= in the unit, which needs a service manager with"
                           f" CAP_SYS_RESOURCE to go above its own hard limit; shell: ulimit -l)"
                           f" or run without locking")
        return False

    def huge_page_bytes(self) -> int:
        """Bytes of this buffer backed by transparent huge pages (from /proc/self/smaps)."""
        lo, hi = self.address, self.address + self.nbytes
        total = 0
        inside = False
        try:
            with open("/proc/self/smaps") as f:
                for line in f:
                    head = line.split(None, 1)[0]
                    if "-" in head and not head.endswith(":"):
                        start, end = (int(x, 16) for x in head.split("-"))
                        inside = start < hi and end > lo
                    elif inside and head == "AnonHugePages:":
                        total += int(line.split()[1]) * 1024
        except OSError:
            return 0
        return min(total, self.nbytes)

    def close(self) -> None:
        """Drop this buffer's references; the mapping goes when the last view of it does.
        Never unmapped explicitly: torch.frombuffer keeps the memoryview object but not its
        buffer export, so an explicit munmap under a live tensor would be a use-after-free."""
        self.view = None
        self._map = None

    def __enter__(self) -> AlignedBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return self.nbytes


def _address_of_writable(buf: Any) -> int:
    holder = ctypes.c_char.from_buffer(buf)
    try:
        return ctypes.addressof(holder)
    finally:
        del holder  # drop the buffer export so the mmap can be closed later


def as_byte_view(obj: Any, *, writable: bool) -> memoryview:
    """A flat uint8 memoryview sharing memory with `obj` (bytes-like, numpy array, CPU torch
    tensor). Raises ValueError for non-contiguous or (when `writable`) read-only input."""
    if type(obj).__module__.startswith("torch"):
        if obj.device.type != "cpu" or not obj.is_contiguous():
            raise ValueError(f"KV block tensor must be a contiguous CPU tensor, got device"
                             f" {obj.device} contiguous={obj.is_contiguous()}")
        obj = obj.reshape(-1).view(_torch_uint8()).numpy()
    view = memoryview(obj)
    if not view.c_contiguous:
        raise ValueError("KV block buffer must be C-contiguous")
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    if writable and view.readonly:
        raise ValueError("destination KV block buffer is read-only")
    return view


def _torch_uint8() -> Any:
    return sys.modules["torch"].uint8


def address_of(view: memoryview) -> int:
    """Virtual address of view[0] (works for read-only views too). On the I/O path: a
    writable view goes through ctypes (~0.25 us), a read-only one through numpy (~2 us)."""
    if view.readonly or not len(view):
        return np.frombuffer(view, dtype=np.uint8).__array_interface__["data"][0] \
            if len(view) else 0
    # the temporary ctypes object holds a buffer export only until addressof returns
    return _addressof(_c_char_from_buffer(view))


def is_direct_io_capable(view: memoryview) -> bool:
    """True when `view` can be handed to an O_DIRECT read or write as it is."""
    return len(view) % ALIGN == 0 and address_of(view) % ALIGN == 0


_addressof = ctypes.addressof
_c_char_from_buffer = ctypes.c_char.from_buffer
