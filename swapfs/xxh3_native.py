"""Xxh3Native: xxh3-64 through the system's libxxhash, called with ctypes, which releases the
GIL for the call.

The xxhash package's functions hold the GIL while they hash (~80 us per 720 KiB block), so a
slot store hashing in the caller's thread kept the I/O dispatcher's thread from reaping and
refilling the ring for as long as it hashed. Here the hash runs with the GIL released and the
dispatcher goes on meanwhile. The values are XXH3_64bits' with seed 0, the same as
`xxhash.xxh3_64_intdigest`: what one wrote, the other verifies. XXH3's output is fixed since
xxHash 0.8.0; older libraries are refused. Only the *_dispatch entry points are used (they pick
AVX2/AVX-512 at run time: ~9 GB/s on cold data here, the plain ones are SSE2 and ~4 GB/s);
a library without them is refused too, and swapfs.checksum falls back to the package. On
Debian libxxhash0 is a dependency of apt, so it is there wherever apt is.

Prior art: xpra's `xxh.pyx` (XXH3_64bits declared nogil). Left out: keeping a streaming state
across calls (one is made per multi-piece payload: ~3 us against ~80 us of hashing).
"""
from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Sequence

import numpy as np

_MIN_VERSION = 800      # XXH_versionNumber() of 0.8.0, the first with a stable XXH3


class Xxh3Native:
    """Attributes: path: the library loaded; _one, _reset, _update, _digest, _create,
    _free: its functions, typed. Stateless between calls, so thread-safe."""

    def __init__(self, lib: ctypes.CDLL, path: str) -> None:
        vp, size, u64, c_int = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint64, ctypes.c_int
        self.path = path
        self._one = _typed(lib.XXH3_64bits_dispatch, [vp, size], u64)
        self._create = _typed(lib.XXH3_createState, [], vp)
        self._free = _typed(lib.XXH3_freeState, [vp], c_int)
        self._reset = _typed(lib.XXH3_64bits_reset, [vp], c_int)
        self._update = _typed(lib.XXH3_64bits_update_dispatch, [vp, vp, size], c_int)
        self._digest = _typed(lib.XXH3_64bits_digest, [vp], u64)

    @classmethod
    def load(cls) -> tuple[Xxh3Native | None, str]:
        """(the binding, "") or (None, why there is none)."""
        path = ctypes.util.find_library("xxhash") or "libxxhash.so.0"
        try:
            lib = ctypes.CDLL(path)
            version = _typed(lib.XXH_versionNumber, [], ctypes.c_uint)()
            if version < _MIN_VERSION:
                return None, f"{path} is xxHash {version}, older than 0.8.0 (XXH3 not final)"
            return cls(lib, path), ""
        except (OSError, AttributeError) as exc:
            return None, f"no usable libxxhash ({exc}); apt-get install libxxhash0"

    def digest(self, data: object) -> int:
        """xxh3-64 of one C-contiguous bytes-like."""
        a = np.frombuffer(data, dtype=np.uint8)
        return self._one(a.ctypes.data, a.nbytes)

    def digest_pieces(self, pieces: Sequence[object]) -> int:
        """xxh3-64 of the concatenation of `pieces`, without concatenating them."""
        if len(pieces) == 1:
            return self.digest(pieces[0])
        state = self._create()
        if not state:
            raise MemoryError("XXH3_createState failed")
        try:
            self._reset(state)
            for piece in pieces:
                a = np.frombuffer(piece, dtype=np.uint8)
                if self._update(state, a.ctypes.data, a.nbytes) != 0:
                    raise ValueError("XXH3_64bits_update failed")
            return self._digest(state)
        finally:
            self._free(state)


def _typed(fn, argtypes: list, restype):
    fn.argtypes = argtypes
    fn.restype = restype
    return fn
