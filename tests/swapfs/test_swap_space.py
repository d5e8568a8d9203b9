import logging
import os
import threading

import numpy as np
import pytest
import torch

from tests.swapfs.conftest import LAYOUT, payload, swap_size
from iosched.aligned_buffer import AlignedBuffer
from swapfs.errors import SlotCorruptError, SwapFullError, SwapNotFoundError
from swapfs.layout import KVLayout
from swapfs.slot_store import HEADER_BYTES, SUPER_BYTES
from swapfs.swap_space import SLOT_FILE, SwapSpace

BB = LAYOUT.block_bytes
KV_SHAPE = (LAYOUT.num_layers, 2, LAYOUT.block_size, LAYOUT.num_kv_heads, LAYOUT.head_dim)


def _arena(num_blocks: int):
    """The engine's KV arena built on a huge-page buffer, as the engine may allocate it."""
    buf = AlignedBuffer(num_blocks * BB)
    kv = torch.frombuffer(buf.view, dtype=torch.float32)[:num_blocks * BB // 4]
    return buf, kv.view(num_blocks, *KV_SHAPE)


def _corrupt_slot(space: SwapSpace, slot: int) -> None:
    with open(os.path.join(os.path.dirname(space.statistics().path), SLOT_FILE), "r+b") as f:
        f.seek(SUPER_BYTES + slot * space._store.stride + HEADER_BYTES + 5)
        f.write(b"\xde\xad")


def _blocks(seeds):
    return [payload(s) for s in seeds]


def test_swap_out_and_in_from_a_torch_arena(space):
    _buf, kv = _arena(6)
    kv[:3] = torch.randn(3, *KV_SHAPE)
    want = kv[:3].clone()
    handles = space.swap_out([kv[i] for i in range(3)])
    kv[:3] = 0
    space.swap_in(handles, [kv[3 + i] for i in range(3)])
    assert torch.equal(kv[3:6], want)
    st = space.statistics()
    assert st.swap_outs == 3 and st.swap_ins == 3 and st.swap_slots == 0
    assert st.free_slots == st.capacity_slots
    with pytest.raises(SwapNotFoundError):
        space.swap_in(handles[:1], [kv[0]])


@pytest.mark.parametrize("g", [1, 2])
def test_swap_out_and_in_from_the_engines_arena(space, g):
    """The engine's arena gives a block as num_layers / g pieces, moved zero-copy."""
    from kvmm_daemon.kv.kv_cache import KVCache
    kv = KVCache(6, num_layers=LAYOUT.num_layers, block_size=LAYOUT.block_size,
                 num_kv_heads=LAYOUT.num_kv_heads, head_dim=LAYOUT.head_dim, layers_per_piece=g)
    kv.kv[:, :3] = torch.randn(kv.kv[:, :3].shape)
    want = kv.kv[:, :3].clone()
    handles = space.swap_out([kv.block_pieces(b) for b in range(3)])
    kv.kv[:, :3] = 0
    space.swap_in(handles, [kv.block_pieces(3 + b) for b in range(3)])
    assert torch.equal(kv.kv[:, 3:6], want)
    # the slot holds the block as [layers, 2, ...] in order, whatever the arena's g
    out = np.zeros(BB, dtype=np.uint8)
    hs = space.swap_out([kv.block_pieces(3)])
    space.swap_in(hs, [out])
    block0 = torch.stack([torch.stack(kv.layer(l))[:, 3] for l in range(LAYOUT.num_layers)])
    assert torch.equal(torch.from_numpy(out).view(torch.float32).view(KV_SHAPE), block0)


def test_swap_in_without_release_then_free_is_idempotent(space):
    handles = space.swap_out(_blocks(range(2)))
    out = [np.zeros(BB, np.uint8) for _ in range(2)]
    space.swap_in(handles, out, release=False)
    assert all((o == payload(i)).all() for i, o in enumerate(out))
    assert space.statistics().swap_slots == 2
    space.free(handles)
    space.free(handles)
    assert space.statistics().swap_slots == 0


def test_full_swap_space_raises_and_counts(space):
    space.swap_out(_blocks(range(32)))
    with pytest.raises(SwapFullError, match="raise --swap-size"):
        space.swap_out(_blocks([99]))
    assert space.statistics().errors["full"] == 1


def test_corrupt_swapped_block_is_never_returned(space, caplog):
    handles = space.swap_out(_blocks(range(3)))
    _corrupt_slot(space, handles[1].slot_id)
    out = [np.zeros(BB, np.uint8) for _ in range(3)]
    with caplog.at_level(logging.ERROR, logger="kvmm.swapfs"):
        with pytest.raises(SlotCorruptError):
            space.swap_in(handles, out)
    assert space.statistics().errors["corrupt"] == 1
    assert space.statistics().swap_slots == 0        # released anyway
    assert sum("checksum" in r.message for r in caplog.records) == 1


def test_prefix_blocks_round_trip_and_lookup(space):
    hashes = [bytes([i]) * 32 for i in range(4)]
    assert space.put_prefix_blocks(list(zip(hashes[:3], _blocks(range(3))))) == 3
    assert space.put_prefix_blocks([(hashes[0], payload(0))]) == 0   # already there
    assert space.has_prefix_blocks(hashes) == 3
    out = [np.zeros(BB, np.uint8) for _ in range(4)]
    assert space.get_prefix_blocks(hashes, out) == 3
    assert all((out[i] == payload(i)).all() for i in range(3))
    assert not space.get_prefix_block(hashes[3], out[3])
    st = space.statistics()
    assert st.prefix_slots == 3 and st.prefix_hits == 3 and st.prefix_misses == 2
    assert space.drop_prefix_blocks(hashes) == 3 and space.has_prefix_blocks(hashes) == 0


def test_prefix_tier_evicts_least_recently_used(space):
    hashes = [i.to_bytes(32, "little") for i in range(40)]
    space.put_prefix_blocks([(h, payload(i)) for i, h in enumerate(hashes[:32])])
    assert space.get_prefix_block(hashes[0], np.zeros(BB, np.uint8))   # 0 is now recent
    assert space.put_prefix_blocks([(h, payload(i)) for i, h in enumerate(hashes[32:34])]) == 2
    assert space.has_prefix_blocks(hashes[:1]) == 1
    assert space.has_prefix_blocks(hashes[1:2]) == 0 and space.has_prefix_blocks(hashes[2:3]) == 0
    assert space.statistics().prefix_evictions == 2
    handles = space.swap_out(_blocks(range(5)))   # swap takes slots from the cache too
    assert len(handles) == 5 and space.statistics().prefix_slots == 27


def test_corrupt_prefix_block_is_a_miss_and_dropped(space):
    hashes = [bytes([i]) * 32 for i in range(3)]
    space.put_prefix_blocks(list(zip(hashes, _blocks(range(3)))))
    _corrupt_slot(space, space.prefix_info(hashes[1]).slot_id)
    out = [np.zeros(BB, np.uint8) for _ in range(3)]
    assert space.get_prefix_blocks(hashes, out) == 1
    assert space.has_prefix_blocks(hashes) == 1 and space.statistics().errors["corrupt"] == 1


def test_session_save_load_incremental_and_delete(space):
    tokens = list(range(40))                        # 3 blocks, the last one partial
    info = space.save_session("chat", 1000, tokens, _blocks(range(3)))
    assert (info.num_blocks, info.num_kv_tokens, info.owner_uid) == (3, 40, 1000)
    written = space.statistics().bytes_written
    info2 = space.save_session("chat", 1000, tokens + [7] * 30, _blocks(range(5)))
    # blocks 0 and 1 are full and unchanged: only blocks 2..4 are written
    assert space.statistics().bytes_written - written == 3 * BB
    assert info2.created == info.created and info2.num_blocks == 5
    out = [np.zeros(BB, np.uint8) for _ in range(5)]
    loaded = space.load_session("chat", out)
    assert loaded.token_ids == tuple(tokens + [7] * 30)
    assert all((out[i] == payload(i)).all() for i in range(5))
    assert [s.session_id for s in space.list_sessions(1000)] == ["chat"]
    assert space.list_sessions(0) == []
    assert space.statistics().session_slots == 5
    space.delete_session("chat")
    assert space.statistics().session_slots == 0
    with pytest.raises(SwapNotFoundError):
        space.session_info("chat")


def test_session_kv_may_cover_fewer_tokens_than_the_history(space):
    info = space.save_session("s", 0, list(range(33)), _blocks(range(2)), num_kv_tokens=32)
    assert info.num_blocks == 2 and info.num_tokens == 33
    with pytest.raises(ValueError, match="fill 3 blocks"):
        space.save_session("s", 0, list(range(33)), _blocks(range(2)))
    with pytest.raises(ValueError, match="not usable"):
        space.save_session("a/b", 0, [], [])


def test_corrupt_session_block_truncates_it_and_reports_valid_prefix(space):
    space.save_session("s", 0, list(range(64)), _blocks(range(4)))
    slot = space.session_snapshot("s").refs[2].slot_id
    _corrupt_slot(space, slot)
    out = [np.zeros(BB, np.uint8) for _ in range(4)]
    with pytest.raises(SlotCorruptError) as exc:
        space.load_session("s", out)
    assert exc.value.blocks_loaded == 2
    assert (out[1] == payload(1)).all()
    info = space.session_info("s")
    assert info.num_blocks == 2 and info.num_kv_tokens == 32 and info.num_tokens == 64
    # the next save rewrites only the dropped tail
    space.save_session("s", 0, list(range(64)), _blocks(range(4)))
    space.load_session("s", out)
    assert all((out[i] == payload(i)).all() for i in range(4))


def test_snapshot_pins_slots_against_reuse(space):
    space.save_session("s", 0, list(range(32)), _blocks(["a", "b"]))
    snap = space.session_snapshot("s")
    space.delete_session("s")
    space.save_session("t", 0, list(range(16 * 30)), _blocks(range(30)))
    with pytest.raises(SwapFullError):
        space.swap_out(_blocks(["x"]))             # the 2 pinned slots are not handed out
    out = [np.zeros(BB, np.uint8) for _ in range(2)]
    assert space.read_refs(snap.refs, out) == [None, None]
    assert (out[0] == payload("a")).all() and (out[1] == payload("b")).all()
    space.release_snapshot(snap)
    assert len(space.swap_out(_blocks(["x", "y"]))) == 2


def test_everything_committed_survives_reopen(swap_dir):
    sp = SwapSpace(swap_dir, swap_size(16), LAYOUT, calibrate=False)
    sp.save_session("s", 5, list(range(20)), _blocks(range(2)))
    sp.put_prefix_blocks([(b"h" * 32, payload("h"))])
    sp.swap_out(_blocks(["gone"]))              # swapped blocks die with the process
    sp.close()
    sp = SwapSpace(swap_dir, swap_size(16), LAYOUT, calibrate=False)
    st = sp.statistics()
    assert (st.sessions, st.session_slots, st.prefix_slots, st.swap_slots) == (1, 2, 1, 0)
    out = [np.zeros(BB, np.uint8) for _ in range(2)]
    assert sp.load_session("s", out).owner_uid == 5 and (out[1] == payload(1)).all()
    assert sp.get_prefix_block(b"h" * 32, out[0]) and (out[0] == payload("h")).all()
    sp.close()


def test_other_model_or_size_drops_the_store(swap_dir, caplog):
    sp = SwapSpace(swap_dir, swap_size(16), LAYOUT, calibrate=False)
    sp.save_session("s", 0, list(range(16)), _blocks([1]))
    sp.close()
    other = KVLayout(model_id="other-model", num_layers=2, block_size=16, num_kv_heads=2,
                     head_dim=64)
    with caplog.at_level(logging.WARNING, logger="kvmm.swapfs"):
        sp = SwapSpace(swap_dir, swap_size(16), other, calibrate=False)
    assert sp.statistics().sessions == 0
    assert any("dropping every stored session" in r.message for r in caplog.records)
    sp.close()


def test_calibration_measures_bandwidth(swap_dir):
    with SwapSpace(swap_dir, swap_size(64), LAYOUT) as sp:
        st = sp.statistics()
        assert st.read_bandwidth > 0 and st.write_bandwidth > 0 and st.free_slots == 64


def test_concurrent_callers(space):
    errors = []

    def worker(k):
        try:
            for r in range(5):
                hs = space.swap_out(_blocks([(k, r), (k, r, 1)]))
                out = [np.zeros(BB, np.uint8) for _ in range(2)]
                space.swap_in(hs, out)
                assert (out[0] == payload((k, r))).all()
                space.put_prefix_blocks([(bytes([k, r]) * 16, payload((k, r)))])
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    st = space.statistics()
    assert st.swap_slots == 0 and st.prefix_slots + st.free_slots == st.capacity_slots
