"""Connection: one client socket, its peer credentials, and serialized frame writes."""
from __future__ import annotations

from typing import Any

import trio

from kvmm_daemon import protocol as P
from kvmm_daemon.daemon.auth import PeerCredentials


class _Flush:
    """One write of the frames gathered while its leader yielded; `failed` once the peer is gone."""
    __slots__ = ("done", "failed")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.failed = False


class Connection:
    """One client.

    Replies are batched per connection: the engine loop hands a step's outputs to every
    stream in one trio batch, so the streams of one connection that a step woke append
    their frames to `_outbox` in the same batch; the first of them (the leader) yields once
    and then writes them all with one `send_all`, the others wait for that write. Many
    streams multiplexed on one connection cost one `sendto` per step, not one per stream.

    Attributes:
      creds: the peer's pid/uid/gid, fixed at connect time by the kernel (SO_PEERCRED).
      _outbox: encoded frames not yet handed to the socket, in the order `send` was called
        (so one stream's frames never reorder).
      _gathering: the flush whose leader is yielding; frames appended now go out with it.
      _send_lock: held while a batch is written, so batches never interleave (trio streams
        refuse concurrent send_all).
      closed: set once the peer is gone, a write was cancelled (a frame may be cut short:
        the stream cannot be resynchronised) or the daemon closed the connection; a send
        then raises BrokenResourceError at once.
    """

    def __init__(self, conn_id: int, stream: trio.SocketStream, creds: PeerCredentials):
        self.id = conn_id
        self.stream = stream
        self.creds = creds
        self._send_lock = trio.Lock()
        self._outbox: list[bytes] = []
        self._gathering: _Flush | None = None
        self.closed = False
        self.frames = 0          # frames handed to send()
        self.writes = 0          # send_all calls: frames ÷ writes is the batching achieved

    async def send(self, message: dict[str, Any]) -> None:
        """Write one frame (batched with the others of this trio batch); BrokenResourceError
        if the peer is gone."""
        if self.closed:
            raise trio.BrokenResourceError("connection closed")
        self._outbox.append(P.encode_frame(message))
        self.frames += 1
        flush = self._gathering
        if flush is not None:
            await flush.done.wait()
        else:
            flush = self._gathering = _Flush()
            try:
                await trio.lowlevel.checkpoint()      # the other streams this step woke append now
                async with self._send_lock:
                    self._gathering = None
                    data, self._outbox = b"".join(self._outbox), []
                    self.writes += 1
                    await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.closed = flush.failed = True
            except BaseException:
                # cancelled before or during the write: the batch is lost or cut short
                self.closed = flush.failed = True
                if self._gathering is flush:
                    self._gathering = None
                raise
            finally:
                flush.done.set()
        if flush.failed:
            raise trio.BrokenResourceError("peer went away")

    async def try_send(self, message: dict[str, Any]) -> bool:
        """Send unless the peer is gone; False when it is."""
        try:
            await self.send(message)
        except trio.BrokenResourceError:
            return False
        return True
