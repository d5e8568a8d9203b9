"""Replies batched per connection: the frames a trio batch produces leave in one write."""
from __future__ import annotations

import socket

import trio
import trio.testing

from kvmm_daemon import protocol as P
from kvmm_daemon.daemon.auth import peer_credentials
from kvmm_daemon.daemon.connection import Connection

from .helpers import RawConn


def open_pair() -> tuple[Connection, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(a))
    return Connection(1, stream, peer_credentials(stream.socket)), b


def read_frames(peer: socket.socket, n: int) -> list[dict]:
    decoder, out = P.FrameDecoder(1 << 20), []
    peer.settimeout(5)
    while len(out) < n:
        out += [P.decode_body(body) for body in decoder.feed(peer.recv(1 << 16))]
    return out


def test_frames_sent_in_one_batch_leave_in_one_write_in_order():
    async def main(conn):
        async def stream(k):
            for i in range(3):               # each step wakes every stream once
                await conn.send({"stream": k, "i": i})
                await trio.lowlevel.checkpoint()
        async with trio.open_nursery() as n:
            for k in range(8):
                n.start_soon(stream, k)

    conn, peer = open_pair()
    trio.run(main, conn)
    frames = read_frames(peer, 24)
    assert conn.frames == 24 and conn.writes <= 6, (conn.frames, conn.writes)
    for k in range(8):                        # no stream's frames reorder
        assert [f["i"] for f in frames if f["stream"] == k] == [0, 1, 2]
    peer.close()


def test_a_gone_peer_fails_every_sender_of_the_batch():
    async def main(conn):
        failures = []

        async def send(k):
            failures.append(not await conn.try_send({"k": k, "pad": "x" * 1000}))
        async with trio.open_nursery() as n:
            for k in range(4):
                n.start_soon(send, k)
        return failures

    conn, peer = open_pair()
    peer.close()
    assert trio.run(main, conn) == [True] * 4
    assert conn.closed


def test_a_cancelled_leader_closes_the_connection_and_fails_its_followers():
    async def main(conn):
        outcome = {}
        scope = trio.CancelScope()

        async def leader():
            with scope:
                await conn.send({"who": "leader"})
            outcome["leader_cancelled"] = scope.cancelled_caught

        async def follower():
            outcome["follower_sent"] = await conn.try_send({"who": "follower"})

        async with conn._send_lock:            # an earlier batch is still being written
            async with trio.open_nursery() as n:
                n.start_soon(leader)
                await trio.testing.wait_all_tasks_blocked()    # the leader waits for the lock
                n.start_soon(follower)
                await trio.testing.wait_all_tasks_blocked()    # the follower waits for its write
                scope.cancel()
        return outcome

    conn, peer = open_pair()
    assert trio.run(main, conn) == {"leader_cancelled": True, "follower_sent": False}
    assert conn.closed and conn.writes == 0      # nothing half-written: the stream stays parseable
    peer.close()


def test_the_daemon_batches_the_streams_of_one_connection(daemon):
    from kvmm_daemon.client import Client

    def replies():
        with Client(daemon.socket) as c:
            return c.stats()["server"]["replies"]

    before = replies()
    conn = RawConn(daemon.socket)
    for i in range(1, 9):
        conn.send({"v": 1, "id": i, "op": "generate", "prompt": "fox " * i, "raw": True,
                   "params": {"max_tokens": 16, "ignore_eos": True}})
    done = 0
    while done < 8:
        done += conn.recv()["type"] == "done"
    conn.close()
    after = replies()
    frames, writes = after["frames"] - before["frames"], after["writes"] - before["writes"]
    assert frames >= 8 * 17, (frames, writes)            # accepted + deltas + done per stream
    assert writes * 2 < frames, (frames, writes)         # decode steps serve all 8 in one write
