"""TrioSwapSpace: the SwapSpace API for trio code — every call that may touch the disk or
SQLite runs in a worker thread under one CapacityLimiter, never on the event loop.

Even statistics() goes through a thread: it takes the space's lock, which a metadata commit
(an fsync) may hold for milliseconds. One thread hop per call, so callers batch (a whole
session, a whole request's blocks) rather than calling per block: a hop costs tens of
microseconds, a block read ~0.3 ms.
"""
from __future__ import annotations

import functools
from typing import Any

import trio

from swapfs.swap_space import SwapSpace

_BLOCKING = ("swap_out", "swap_in", "free", "put_prefix_blocks", "get_prefix_blocks",
             "get_prefix_block", "has_prefix_blocks", "drop_prefix_blocks", "list_prefixes",
             "prefix_snapshot", "release_snapshot", "save_session", "load_session",
             "session_info", "list_sessions", "delete_session", "session_snapshot",
             "read_refs", "stage_blocks", "discard_staged", "commit_staged_session",
             "statistics", "prefix_info", "calibrate")


class TrioSwapSpace:
    """Async facade over a SwapSpace.

    Attributes:
      space: the wrapped SwapSpace (its sync API stays usable from other threads).
      limiter: bounds the worker threads this facade occupies at once.
    """

    def __init__(self, space: SwapSpace, limiter: trio.CapacityLimiter | None = None) -> None:
        self.space = space
        self.limiter = limiter if limiter is not None else trio.CapacityLimiter(4)

    async def run(self, fn, *args: Any, **kwargs: Any) -> Any:
        """Run any blocking callable in a worker thread under `limiter`."""
        return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs),
                                             limiter=self.limiter)


def _make(name: str):
    async def method(self: TrioSwapSpace, *args: Any, **kwargs: Any) -> Any:
        return await self.run(getattr(self.space, name), *args, **kwargs)
    method.__name__ = method.__qualname__ = name
    method.__doc__ = f"`SwapSpace.{name}` in a worker thread. " + \
        (getattr(SwapSpace, name).__doc__ or "")
    return method


for _name in _BLOCKING:
    setattr(TrioSwapSpace, _name, _make(_name))
