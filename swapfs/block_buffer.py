"""BlockBuffer: the bytes of one KV block as one or more memory ranges, in order.

A slot's payload is a block's bytes; in memory those bytes need not be one range. The
engine's KV arena is layer-major (each layer's blocks side by side, so attention reads a
layer's blocks close together), so one block is one range per layer; a scratch buffer or an
export holds it in one range. A BlockBuffer names the ranges (`pieces`) whose concatenation
is the payload, and the slot store moves it with one vectored request: the slot's header
page, then the pieces as they lie (zero copy when every piece is O_DIRECT-ready), or
through a bounce area that the pieces are gathered into or scattered from. The payload's
checksum is taken over the pieces in order, so it equals the checksum of the concatenation:
the slot file and exports do not depend on how the block lies in memory.

Prior art: vLLM keeps one KV tensor per layer and swaps a block layer by layer; here the
layers' pieces go in one request, as readv(2)/writev(2) gather them. Left out: mixing
zero-copy and bounced pieces in one block (one unaligned piece bounces the whole block).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from iosched.aligned_buffer import as_byte_view, is_direct_io_capable


class BlockBuffer:
    """Attributes and invariants:
      pieces: flat uint8 memoryviews, in payload order; none is empty; writable when the
        buffer was made for a read.
      nbytes: the sum of the pieces' lengths (the payload length).
    """

    __slots__ = ("pieces", "nbytes")

    def __init__(self, pieces: Sequence[memoryview]) -> None:
        self.pieces = tuple(pieces)
        self.nbytes = sum(len(p) for p in self.pieces)
        assert self.pieces and all(len(p) for p in self.pieces), "a block has bytes"

    @classmethod
    def of(cls, payload: Any, *, writable: bool) -> BlockBuffer:
        """A payload given as one buffer (bytes-like, numpy array, CPU torch tensor) or as a
        list/tuple of them (the pieces in order). ValueError for a non-contiguous, empty or
        (when `writable`) read-only buffer."""
        if isinstance(payload, BlockBuffer):
            return payload
        parts = payload if isinstance(payload, (list, tuple)) else (payload,)
        views = [p if _is_byte_view(p, writable) else as_byte_view(p, writable=writable)
                 for p in parts]
        if not views or not all(len(v) for v in views):
            raise ValueError("KV block buffer has an empty piece (or none at all)")
        return cls(views)

    def direct_io_capable(self) -> bool:
        """Every piece can be handed to an O_DIRECT transfer as it is."""
        return all(is_direct_io_capable(p) for p in self.pieces)

    def gather_into(self, area: memoryview) -> None:
        """Copy the payload into area[:nbytes] (the pieces laid end to end)."""
        at = 0
        for p in self.pieces:
            area[at:at + len(p)] = p
            at += len(p)

    def scatter_from(self, area: memoryview) -> None:
        """Copy area[:nbytes] into the pieces."""
        at = 0
        for p in self.pieces:
            p[:] = area[at:at + len(p)]
            at += len(p)

    def tobytes(self) -> bytes:
        return b"".join(self.pieces)


def _is_byte_view(obj: Any, writable: bool) -> bool:
    """obj is already a flat uint8 memoryview fit for the transfer (the arena's pieces are):
    the fast path, ~0.1 us instead of as_byte_view's ~1 us per piece."""
    return (type(obj) is memoryview and obj.format == "B" and obj.ndim == 1
            and obj.c_contiguous and not (writable and obj.readonly))
