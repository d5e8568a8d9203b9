"""accept_forever: the accept loop shared by the msgpack and HTTP servers.

Like trio's `serve_listeners`, but each server keeps its own cancel scope (so SIGTERM stops
accepting without closing open connections) and the listener is closed when the loop ends.
Running out of file descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM) backs off for
100 ms instead of failing, as trio does.
"""
from __future__ import annotations

import errno
import logging
from typing import Any, Awaitable, Callable

import trio

log = logging.getLogger("kvmm.accept")
BACKOFF_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


async def accept_forever(listener: trio.SocketListener, handler: Callable[[trio.SocketStream], Awaitable[Any]],
                         nursery: trio.Nursery) -> None:
    """Accept connections and start `handler(stream)` for each in `nursery`, until cancelled;
    then close the listener."""
    try:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno in BACKOFF_ERRNOS:
                    log.warning("accept: %s; retrying in 100 ms", exc.strerror)
                    await trio.sleep(0.1)
                    continue
                raise
            nursery.start_soon(handler, stream)
    finally:
        with trio.CancelScope(shield=True):
            await listener.aclose()
