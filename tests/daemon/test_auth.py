"""Peer credentials and per-uid limits."""
import os
import socket

import pytest

from kvmm_daemon.daemon.auth import PeerCredentials, UidLimits, blocks_needed, peer_credentials
from kvmm_daemon.protocol import ErrorCode, ProtocolError


def test_peer_credentials_of_a_socketpair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    creds = peer_credentials(a)
    assert creds == PeerCredentials(os.getpid(), os.getuid(), os.getgid())
    a.close(), b.close()


def test_access_rule():
    root, alice = PeerCredentials(1, 0, 0), PeerCredentials(2, 1000, 1000)
    assert root.may_access(1000) and alice.may_access(1000) and not alice.may_access(1001)


def test_blocks_needed():
    assert blocks_needed(10, 6, 1, 16) == 1
    assert blocks_needed(10, 7, 1, 16) == 2
    assert blocks_needed(0, 1, 3, 16) == 3


def test_uid_limits_count_and_refuse():
    lim = UidLimits(max_requests=2, max_blocks=10)
    lim.admit(1000, 4)
    lim.admit(1000, 6)
    with pytest.raises(ProtocolError) as e:
        lim.admit(1000, 0)
    assert e.value.code is ErrorCode.LIMIT_EXCEEDED and "max_requests_per_uid" in e.value.message
    lim.admit(1001, 10)                             # other uids are separate
    lim.release(1000, 6)
    with pytest.raises(ProtocolError, match="max_kv_blocks_per_uid"):
        lim.admit(1000, 7)
    s = lim.statistics()
    assert s.refused == 2 and [(u.uid, u.requests, u.kv_blocks) for u in s.usage] == [(1000, 1, 4), (1001, 1, 10)]
    lim.release(1000, 4)
    lim.release(1001, 10)
    assert lim.statistics().usage == () and lim.in_flight(1000) == 0
