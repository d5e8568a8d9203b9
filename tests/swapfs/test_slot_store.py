import os

import numpy as np
import pytest

from tests.swapfs.conftest import LAYOUT, payload
from iosched.aligned_buffer import AlignedBuffer
from swapfs.errors import SlotCorruptError, SwapBusyError
from swapfs.slot_store import HEADER_BYTES, SUPER_BYTES, SlotStore

BB = LAYOUT.block_bytes


@pytest.fixture
def store(swap_dir):
    st = SlotStore(os.path.join(swap_dir, "s.slots"), BB, 16, layout_id=42, io_threads=2)
    yield st
    st.close()


def _poke(store: SlotStore, offset: int, data: bytes) -> None:
    """Change the file behind the store's back (buffered fd, like a disk would)."""
    with open(store.path, "r+b") as f:
        f.seek(offset)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _read_one(store, slot, gen):
    out = np.zeros(BB, dtype=np.uint8)
    err = store.read([(slot, gen, memoryview(out))])[0]
    return out, err


def test_round_trip_aligned_and_unaligned_buffers(store):
    with AlignedBuffer(4 * BB) as arena:
        aligned = [arena.view[i * BB:(i + 1) * BB] for i in range(4)]
        for i, v in enumerate(aligned):
            v[:] = payload(i).tobytes()
        crcs = store.write([(3 + i, 10 + i, v) for i, v in enumerate(aligned)])
        assert len(crcs) == 4
        unaligned = np.zeros(BB + 1, dtype=np.uint8)[1:]
        unaligned[:] = payload("u")
        store.write([(9, 1, memoryview(unaligned))])
        store.sync()
        for i in range(4):
            out, err = _read_one(store, 3 + i, 10 + i)
            assert err is None and (out == payload(i)).all()
        into = np.zeros(BB + 1, dtype=np.uint8)[1:]
        assert store.read([(9, 1, memoryview(into))]) == [None]
        assert (into == payload("u")).all()
        del aligned
    assert store.bytes_written == 5 * BB and store.bytes_read == 5 * BB


def test_data_survives_reopen_and_other_layout_reformats(swap_dir):
    path = os.path.join(swap_dir, "s.slots")
    st = SlotStore(path, BB, 4, layout_id=1)
    st.write([(2, 5, memoryview(payload(2)))])
    st.sync()
    st.close()
    st = SlotStore(path, BB, 4, layout_id=1)
    assert not st.reinitialized
    out, err = _read_one(st, 2, 5)
    assert err is None and (out == payload(2)).all()
    st.close()
    st = SlotStore(path, BB, 4, layout_id=2)
    assert st.reinitialized
    _out, err = _read_one(st, 2, 5)
    assert isinstance(err, SlotCorruptError)
    st.close()


def test_flipped_payload_byte_is_detected(store):
    store.write([(1, 7, memoryview(payload(1)))])
    store.sync()
    offset = SUPER_BYTES + store.stride + HEADER_BYTES + 1000
    _poke(store, offset, bytes([payload(1)[1000] ^ 0x10]))
    out, err = _read_one(store, 1, 7)
    assert isinstance(err, SlotCorruptError) and "checksum" in str(err)


def test_torn_write_is_detected(store):
    """A new header over a payload half old, half new (power cut mid-write)."""
    store.write([(0, 1, memoryview(payload("old")))])
    store.sync()
    old_tail = payload("old")[BB // 2:].tobytes()
    store.write([(0, 2, memoryview(payload("new")))])
    store.sync()
    _poke(store, SUPER_BYTES + HEADER_BYTES + BB // 2, old_tail)
    _out, err = _read_one(store, 0, 2)
    assert isinstance(err, SlotCorruptError)


def test_generation_mismatch_and_never_written_slot(store):
    store.write([(4, 8, memoryview(payload(4)))])
    _out, err = _read_one(store, 4, 7)
    assert isinstance(err, SlotCorruptError) and "generation 8, expected 7" in str(err)
    _out, err = _read_one(store, 5, 1)
    assert isinstance(err, SlotCorruptError) and "header is not valid" in str(err)


def test_corrupt_header_is_detected(store):
    store.write([(6, 3, memoryview(payload(6)))])
    _poke(store, SUPER_BYTES + 6 * store.stride + 20, b"\xff")
    _out, err = _read_one(store, 6, 3)
    assert isinstance(err, SlotCorruptError)


def test_one_bad_slot_in_a_batch_leaves_the_others_good(store):
    views = [memoryview(payload(i)) for i in range(6)]
    store.write([(i, 1, v) for i, v in enumerate(views)])
    _poke(store, SUPER_BYTES + 2 * store.stride + HEADER_BYTES, b"\x00\x01\x02")
    outs = [np.zeros(BB, dtype=np.uint8) for _ in range(6)]
    errs = store.read([(i, 1, memoryview(o)) for i, o in enumerate(outs)])
    assert [e is None for e in errs] == [True, True, False, True, True, True]
    assert all((outs[i] == payload(i)).all() for i in (0, 1, 3, 4, 5))


def test_second_open_of_the_same_file_is_refused(store):
    with pytest.raises(SwapBusyError, match="in use"):
        SlotStore(store.path, BB, 16, layout_id=42)


def test_bad_arguments(store):
    with pytest.raises(IndexError):
        store.write([(16, 1, memoryview(payload(0)))])
    with pytest.raises(ValueError, match="bytes"):
        store.write([(0, 1, memoryview(b"short"))])
    with pytest.raises(ValueError, match="same slot twice"):
        store.write([(0, 1, memoryview(payload(0))), (0, 2, memoryview(payload(0)))])


def test_runs_of_consecutive_slots_are_one_request_each_and_writes_can_stay_in_flight(store):
    """Slots 3,4,5 then 9 then 10: consecutive slots go as one vectored request; the write
    returns with its requests in flight (submit_write) and a run of mixed slot order reads
    back verified; the scratch goes back to the pool once the batch ended."""
    order = [3, 4, 5, 9, 10, 2]
    bufs = [np.asarray(payload(s)) for s in order]
    pending = store.submit_write([(s, 7, memoryview(b)) for s, b in zip(order, bufs)])
    # the first run is a single slot (the device starts after one checksum)
    assert [r.length for r in pending.requests][0] == store.stride
    assert len(pending.requests) == 4       # [3] [4,5] [9,10] [2]
    crcs = store.finish_write(pending)
    assert pending.done() and pending.scratch is None and store.finish_write(pending) == crcs
    outs = [np.zeros(BB, dtype=np.uint8) for _ in order]
    before = store.scheduler.statistics().requests_by_priority["KV_SWAP_IN"]
    assert store.read([(s, 7, memoryview(o)) for s, o in zip(order, outs)]) == [None] * 6
    assert store.scheduler.statistics().requests_by_priority["KV_SWAP_IN"] - before == 3
    assert all((o == payload(s)).all() for s, o in zip(order, outs))


def test_read_runs_shrink_toward_the_end_and_are_not_merged(swap_dir):
    """A read batch goes in runs of at most 1/queue depth of the slots still to read: each
    wave of transfers in flight is a fraction of what remains and the last is short (its
    checksums are the only ones no read overlaps). The scheduler keeps them apart."""
    st = SlotStore(os.path.join(swap_dir, "r.slots"), BB, 24, layout_id=42, io_threads=4)
    try:
        bufs = [np.asarray(payload(s)) for s in range(20)]
        st.write([(s, 1, memoryview(b)) for s, b in enumerate(bufs)])
        runs = st._runs([(s, 1, None) for s in range(20)], shrinking=True)
        assert [b - a for a, b in runs] == [5, 4, 3, 2, 2, 1, 1, 1, 1]
        before = st.scheduler.statistics()
        outs = [np.zeros(BB, dtype=np.uint8) for _ in bufs]
        assert st.read([(s, 1, memoryview(o)) for s, o in enumerate(outs)]) == [None] * 20
        after = st.scheduler.statistics()
        assert after.merges == before.merges
        assert after.requests_by_priority["KV_SWAP_IN"] - \
            before.requests_by_priority["KV_SWAP_IN"] == len(runs)
        assert all((o == b).all() for o, b in zip(outs, bufs))
    finally:
        st.close()


def test_pieces_round_trip_zero_copy_and_bounced(store):
    """A payload given as pieces (the layer-major arena gives one per layer) is stored as
    their concatenation: it reads back whole or in other pieces, with the same checksum as
    the contiguous bytes. Aligned pieces go to the kernel as they are, one vectored request
    per run; unaligned ones bounce."""
    half = BB // 2
    with AlignedBuffer(4 * BB) as arena:
        # two "layers", each holding the blocks side by side: block i = [layer0[i], layer1[i]]
        layers = [arena.view[l * 2 * BB:(l + 1) * 2 * BB] for l in range(2)]
        pieces = [[layers[l][i * half:(i + 1) * half] for l in range(2)] for i in range(4)]
        for i, ps in enumerate(pieces):
            whole = payload(("p", i)).tobytes()
            ps[0][:], ps[1][:] = whole[:half], whole[half:]
        before = store.scheduler.statistics().requests_by_priority["KV_WRITE_BACK"]
        crcs = store.write([(4 + i, 3, ps) for i, ps in enumerate(pieces)])
        assert store.scheduler.statistics().requests_by_priority["KV_WRITE_BACK"] - before == 2
        contiguous = store.write([(12, 3, memoryview(payload(("p", 0))))])
        assert crcs[0] == contiguous[0]                 # the checksum of the concatenation
        for i in range(4):
            out, err = _read_one(store, 4 + i, 3)
            assert err is None and (out == payload(("p", i))).all()
        # read into aligned pieces (zero copy) and into unaligned pieces (bounced)
        for ps in pieces:
            ps[0][:] = bytes(half)
            ps[1][:] = bytes(half)
        assert store.read([(4 + i, 3, ps) for i, ps in enumerate(pieces)]) == [None] * 4
        assert all(bytes(ps[0]) + bytes(ps[1]) == payload(("p", i)).tobytes()
                   for i, ps in enumerate(pieces))
        odd = np.zeros(BB + 1, dtype=np.uint8)[1:]
        odd_pieces = [memoryview(odd[:100]), memoryview(odd[100:])]
        assert store.read([(5, 3, odd_pieces)]) == [None]
        assert (odd == payload(("p", 1))).all()
        store.write([(13, 4, odd_pieces)])             # unaligned pieces written (bounced)
        out, err = _read_one(store, 13, 4)
        assert err is None and (out == payload(("p", 1))).all()
        del layers, pieces, ps


def test_corrupt_piece_is_detected(store):
    with AlignedBuffer(BB) as buf:
        ps = [buf.view[:BB // 2], buf.view[BB // 2:BB]]
        ps[0][:], ps[1][:] = payload(1).tobytes()[:BB // 2], payload(1).tobytes()[BB // 2:]
        store.write([(2, 1, ps)])
        _poke(store, SUPER_BYTES + 2 * store.stride + HEADER_BYTES + BB - 3, b"\x01\x02")
        err = store.read([(2, 1, ps)])[0]
        assert isinstance(err, SlotCorruptError) and "checksum" in str(err)
        del ps


def test_pieces_of_the_wrong_total_length_are_refused(store):
    with pytest.raises(ValueError, match="bytes"):
        store.write([(0, 1, [memoryview(payload(0))[:10], memoryview(payload(0))])])
    with pytest.raises(ValueError, match="empty piece"):
        store.write([(0, 1, [memoryview(b""), memoryview(payload(0))])])
