"""Connection: one client socket, its peer credentials, and serialized frame writes."""
from __future__ import annotations

from typing import Any

import trio

from kvmm_daemon import protocol as P
from kvmm_daemon.daemon.auth import PeerCredentials


class Connection:
    """One client.

    Attributes:
      creds: the peer's pid/uid/gid, fixed at connect time by the kernel (SO_PEERCRED).
      _send_lock: held while a frame is written, so frames of concurrent streams never
        interleave (trio streams refuse concurrent send_all).
      closed: set once the peer is gone or the daemon closed the connection; a send then
        raises BrokenResourceError at once.
    """

    def __init__(self, conn_id: int, stream: trio.SocketStream, creds: PeerCredentials):
        self.id = conn_id
        self.stream = stream
        self.creds = creds
        self._send_lock = trio.Lock()
        self.closed = False

    async def send(self, message: dict[str, Any]) -> None:
        """Write one frame; BrokenResourceError if the peer is gone."""
        if self.closed:
            raise trio.BrokenResourceError("connection closed")
        data = P.encode_frame(message)
        async with self._send_lock:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.closed = True
                raise trio.BrokenResourceError("peer went away") from None

    async def try_send(self, message: dict[str, Any]) -> bool:
        """Send unless the peer is gone; False when it is."""
        try:
            await self.send(message)
        except trio.BrokenResourceError:
            return False
        return True
