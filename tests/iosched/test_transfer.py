"""Pieces of vectored requests and the iovecs of a transfer, without a device."""
from __future__ import annotations

from iosched.aligned_buffer import AlignedBuffer, address_of
from iosched.request import IORequest, Priority
from iosched.scheduler import _pack
from iosched.transfer import Piece, Transfer

KiB = 1024


def _views(buf, sizes):
    out, at = [], 0
    for n in sizes:
        out.append(buf.view[at:at + n])
        at += n + 4 * KiB                        # gaps: the buffers are scattered in memory
    return out


def test_small_buffers_pack_into_one_piece_and_big_ones_are_cut_at_the_step():
    with AlignedBuffer(4 << 20) as buf:
        views = _views(buf, [4 * KiB] + [24 * KiB] * 30)          # a slot of the KV arena
        parts = _pack(views, [address_of(v) for v in views], 4 << 20, 256)
        assert len(parts) == 1 and parts[0][0] == tuple(views)
        views = _views(buf, [100 * KiB, 60 * KiB, 8 * KiB])
        parts = _pack(views, [address_of(v) for v in views], 64 * KiB, 256)
        assert [sum(len(v) for v in p) for p, _a in parts] == [64 * KiB, 64 * KiB, 40 * KiB]
        assert [len(p) for p, _a in parts] == [1, 2, 2]           # 100 = 64 + 36; 36 + 28
        assert parts[1][1][0] == address_of(views[0]) + 64 * KiB   # addresses follow the cut
        assert b"".join(bytes(v) for p, _a in parts for v in p) == \
            b"".join(bytes(v) for v in views)
        many = _views(buf, [4 * KiB] * 10)
        assert [len(p) for p, _a in _pack(many, [address_of(v) for v in many], 1 << 20, 4)] \
            == [4, 4, 2]                                           # at most max_iov buffers


def test_a_short_transfer_resumes_inside_a_piece_of_several_buffers():
    with AlignedBuffer(1 << 20) as buf:
        views = tuple(_views(buf, [8 * KiB, 16 * KiB, 8 * KiB]))
        req = IORequest("read", 3, 0, list(views), Priority.KV_SWAP_IN, None, 0.0)
        addrs = tuple(address_of(v) for v in views)
        t = Transfer([Piece(req, 0, views[:2], addrs[:2], 0), Piece(req, 24 * KiB, views[2:],
                                                                    addrs[2:], 1)])
        assert t.length == 32 * KiB and [a for a, _n in t.spans()] == list(addrs)
        assert t.advance(12 * KiB) == []                 # 8 KiB + 4 KiB of the second buffer
        assert t.spans() == [(addrs[1] + 4 * KiB, 12 * KiB), (addrs[2], 8 * KiB)]
        assert [len(v) for v in t.iov()] == [12 * KiB, 8 * KiB]
        assert address_of(t.iov()[0]) == addrs[1] + 4 * KiB
        assert t.advance(12 * KiB) == [t.pieces[0]]      # the first piece is complete
        assert t.spans() == [(addrs[2], 8 * KiB)]
