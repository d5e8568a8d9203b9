"""Block checksums: the fastest algorithm this installation has, recorded with the data.

Checksumming a block costs about as much CPU as moving it: zlib.crc32 runs at ~1.5-3.5 GB/s on
cold data here, slower than the O_DIRECT path it guards, while xxh3-64 runs at ~9 GB/s and
hardware crc32c (crc32c package) at ~8 GB/s. xxh3-64 comes from the system's libxxhash when
it loads (swapfs.xxh3_native: the GIL is released while it hashes), else from the xxhash
package (which holds the GIL: the I/O dispatcher thread waits meanwhile); both give the same
values. zlib.crc32 releases the GIL on large buffers. The slot file's superblock and
every export name the algorithm they were written with, so a store keeps its algorithm as
long as it is importable, and a reader never verifies with the wrong one.
"""
from __future__ import annotations

import functools
import zlib
from collections.abc import Callable, Sequence

from swapfs.errors import SwapConfigError
from swapfs.xxh3_native import Xxh3Native

Checksum = Callable[[object], int]
PiecesChecksum = Callable[[Sequence[object]], int]


def _xxh3_64() -> Checksum:
    native = _native()
    if native is not None:
        return native.digest
    import xxhash
    return xxhash.xxh3_64_intdigest


@functools.cache
def _native() -> Xxh3Native | None:
    return Xxh3Native.load()[0]


def _crc32c() -> Checksum:
    import crc32c
    return crc32c.crc32c


def _crc32() -> Checksum:
    return zlib.crc32


_LOADERS: dict[str, Callable[[], Checksum]] = {
    "xxh3_64": _xxh3_64, "crc32c": _crc32c, "crc32": _crc32}   # in order of preference


def get(name: str) -> Checksum:
    """The function of algorithm `name` (bytes-like -> int < 2**64)."""
    loader = _LOADERS.get(name)
    if loader is None:
        raise SwapConfigError(f"unknown checksum algorithm {name!r}; known: {sorted(_LOADERS)}")
    try:
        return loader()
    except ImportError:
        package = {"xxh3_64": "xxhash (or the system library libxxhash0)",
                   "crc32c": "crc32c"}[name]
        raise SwapConfigError(f"checksum {name} needs the Python package {package}; install it"
                              " or reformat the swap directory") from None


def _pieces_xxh3_64() -> PiecesChecksum:
    native = _native()
    if native is not None:
        return native.digest_pieces
    import xxhash
    one = xxhash.xxh3_64_intdigest

    def digest(pieces: Sequence[object]) -> int:
        if len(pieces) == 1:
            return one(pieces[0])
        state = xxhash.xxh3_64()
        for piece in pieces:
            state.update(piece)
        return state.intdigest()
    return digest


def _chained(name: str) -> PiecesChecksum:
    """crc32 and crc32c continue from a previous value: fn(data, value)."""
    fn = get(name)

    def digest(pieces: Sequence[object]) -> int:
        value = 0
        for piece in pieces:
            value = fn(piece, value)
        return value
    return digest


def get_pieces(name: str) -> PiecesChecksum:
    """The function of algorithm `name` over a sequence of bytes-likes: the checksum of
    their concatenation, without concatenating them."""
    if name == "xxh3_64":
        get(name)                  # the same error as get() when xxhash is missing
        return _pieces_xxh3_64()
    return _chained(name)


def releases_gil(name: str) -> bool:
    """Hashing a block with `name` (as get_pieces gives it) lets other Python threads run:
    xxh3-64 from the system's libxxhash and zlib's crc32 (above 5 KiB) do; the xxhash
    package does not, and crc32c is not known to."""
    if name == "xxh3_64":
        return _native() is not None
    return name == "crc32"


def available(name: str) -> bool:
    try:
        get(name)
        return True
    except SwapConfigError:
        return False


def best() -> str:
    """The preferred algorithm among those importable here (crc32 always is)."""
    return next(name for name in _LOADERS if available(name))
