"""Who a peer is (SO_PEERCRED) and what each uid may hold at once.

The kernel tells a Unix-socket server the pid/uid/gid of the process that connected
(SO_PEERCRED, unix(7)); it cannot be forged by the client, so it is the only identity the
daemon trusts. Access to the socket itself is the file mode (0660, group kvmm); inside, the
rule is ownership: a request or session belongs to the uid that created it, and only that uid
or root may see, cancel or delete it.

`UidLimits` bounds what one uid holds in flight: generate requests and KV blocks (reserved
up front as ceil((prompt + max_tokens) / block_size) per choice, the most a request can grow
to), so one app cannot starve the others. Mechanism only: it answers and counts; the server
decides what to refuse. Left out: per-gid quotas, rate limits over time.
"""
from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from kvmm_daemon.protocol import ErrorCode, ProtocolError

_UCRED = struct.Struct("3i")


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    pid: int
    uid: int
    gid: int

    @property
    def is_root(self) -> bool:
        return self.uid == 0

    def may_access(self, owner_uid: int) -> bool:
        return self.uid == 0 or self.uid == owner_uid


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    """The connected peer's credentials as the kernel recorded them at connect()."""
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return PeerCredentials(pid, uid, gid)


def blocks_needed(prompt_tokens: int, max_tokens: int, num_choices: int, block_size: int) -> int:
    """The most KV blocks a request can hold: every choice at full length, nothing shared."""
    assert prompt_tokens >= 0 and max_tokens >= 1 and num_choices >= 1 and block_size >= 1
    return num_choices * -(-(prompt_tokens + max_tokens) // block_size)


@dataclass(frozen=True, slots=True)
class UidUsage:
    uid: int
    requests: int
    kv_blocks: int


@dataclass(frozen=True, slots=True)
class UidLimitsStatistics:
    max_requests_per_uid: int
    max_kv_blocks_per_uid: int | None
    refused: int
    usage: tuple[UidUsage, ...]

    def as_dict(self) -> dict:
        return {"max_requests_per_uid": self.max_requests_per_uid,
                "max_kv_blocks_per_uid": self.max_kv_blocks_per_uid,
                "refused": self.refused,
                "usage": [{"uid": u.uid, "requests": u.requests, "kv_blocks": u.kv_blocks}
                          for u in self.usage]}


class UidLimits:
    """Counts in-flight requests and reserved KV blocks per uid.

    Attributes:
      _requests[uid], _blocks[uid]: sums over the uid's admitted, not yet released requests;
        an entry exists iff the uid has at least one such request (no zero entries).
      refused: admissions refused since start.
    """

    def __init__(self, max_requests: int, max_blocks: int | None):
        assert max_requests >= 1 and (max_blocks is None or max_blocks >= 1)
        self.max_requests = max_requests
        self.max_blocks = max_blocks
        self._requests: dict[int, int] = {}
        self._blocks: dict[int, int] = {}
        self.refused = 0

    def admit(self, uid: int, blocks: int) -> None:
        """Count one more request of `uid` needing `blocks`; ProtocolError if over a limit."""
        assert blocks >= 0
        running = self._requests.get(uid, 0)
        if running >= self.max_requests:
            self.refused += 1
            raise ProtocolError(ErrorCode.LIMIT_EXCEEDED,
                                f"uid {uid} already has {running} requests in flight, the limit "
                                f"(max_requests_per_uid); wait for one to finish or cancel one")
        held = self._blocks.get(uid, 0)
        if self.max_blocks is not None and held + blocks > self.max_blocks:
            self.refused += 1
            raise ProtocolError(ErrorCode.LIMIT_EXCEEDED,
                                f"uid {uid} would hold {held + blocks} KV blocks, over the limit of "
                                f"{self.max_blocks} (max_kv_blocks_per_uid); lower max_tokens or n, "
                                f"or wait for running requests")
        self._requests[uid] = running + 1
        self._blocks[uid] = held + blocks

    def release(self, uid: int, blocks: int) -> None:
        assert self._requests.get(uid, 0) >= 1 and self._blocks.get(uid, 0) >= blocks
        self._requests[uid] -= 1
        self._blocks[uid] -= blocks
        if self._requests[uid] == 0:
            assert self._blocks[uid] == 0
            del self._requests[uid], self._blocks[uid]

    def in_flight(self, uid: int) -> int:
        return self._requests.get(uid, 0)

    def statistics(self) -> UidLimitsStatistics:
        usage = tuple(UidUsage(uid, n, self._blocks[uid]) for uid, n in sorted(self._requests.items()))
        return UidLimitsStatistics(self.max_requests, self.max_blocks, self.refused, usage)
