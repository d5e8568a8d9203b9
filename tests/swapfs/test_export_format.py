import numpy as np
import pytest
import trio

from tests.swapfs.conftest import LAYOUT, payload, swap_size
from swapfs.errors import SessionExistsError, SwapFormatError
from swapfs.export_format import ExportReader, SessionImporter, build_preamble
from swapfs.layout import KVLayout
from swapfs.swap_space import SwapSpace
from swapfs.trio_api import TrioSwapSpace

BB = LAYOUT.block_bytes


def _export(space, sid) -> bytes:
    snap = space.session_snapshot(sid)
    reader = ExportReader(space, snap.refs,
                          build_preamble(space.layout, snap.session, [r.crc for r in snap.refs],
                                         space.checksum_name))
    try:
        chunks = [reader.read(off, 100_000) for off in range(0, reader.size, 100_000)]
    finally:
        reader.close()
        space.release_snapshot(snap)
    data = b"".join(chunks)
    assert len(data) == reader.size
    return data


def _import(space, name, data: bytes, step: int = 65536, uid: int = 0):
    imp = SessionImporter(space, name, uid)
    try:
        for off in range(0, len(data), step):
            imp.write(off, data[off:off + step])
        return imp.finish()
    except BaseException:
        imp.abort()
        raise


def test_export_import_round_trip(space):
    space.save_session("a", 1000, list(range(50)), [payload(i) for i in range(4)],
                       num_kv_tokens=49)
    data = _export(space, "a")
    assert len(data) % 4096 == 0 and data.endswith(payload(3).tobytes())
    preamble = build_preamble(LAYOUT, space.session_info("a"), [0] * 4, space.checksum_name)
    assert len(data) == len(preamble) + 4 * BB
    info = _import(space, "b", data, step=4096 * 3 + 17, uid=1001)
    assert (info.owner_uid, info.num_kv_tokens, info.token_ids) == (1001, 49, tuple(range(50)))
    out = [np.zeros(BB, np.uint8) for _ in range(4)]
    space.load_session("b", out)
    assert all((out[i] == payload(i)).all() for i in range(4))
    with pytest.raises(SessionExistsError):
        _import(space, "a", data)
    assert space.statistics().session_slots == 8     # the refused import left nothing


def test_damaged_truncated_or_foreign_exports_are_refused(space, swap_dir):
    space.save_session("a", 0, list(range(32)), [payload(i) for i in range(2)])
    data = bytearray(_export(space, "a"))
    free = space.statistics().free_slots
    damaged = bytearray(data)
    damaged[-10] ^= 1
    with pytest.raises(SwapFormatError, match="block 1 checksum"):
        _import(space, "x", bytes(damaged))
    with pytest.raises(SwapFormatError, match="file ends"):
        _import(space, "x", bytes(data[:-BB]))
    with pytest.raises(SwapFormatError, match="bad magic"):
        _import(space, "x", b"not an export" * 1000)
    with pytest.raises(SwapFormatError, match="beyond"):
        _import(space, "x", bytes(data) + b"extra")
    imp = SessionImporter(space, "x", 0)
    with pytest.raises(SwapFormatError, match="sequentially"):
        imp.write(4096, bytes(data[4096:8192]))
    imp.abort()
    assert space.statistics().free_slots == free
    other = KVLayout(model_id="other", num_layers=2, block_size=16, num_kv_heads=2, head_dim=64)
    with SwapSpace(swap_dir + "/other", swap_size(4, other), other, calibrate=False) as sp2:
        with pytest.raises(SwapFormatError, match="field layout.model_id"):
            _import(sp2, "x", bytes(data))


def test_trio_facade_runs_calls_in_threads(space):
    async def main():
        tsp = TrioSwapSpace(space, trio.CapacityLimiter(2))
        handles = await tsp.swap_out([payload(1), payload(2)])
        out = [np.zeros(BB, np.uint8) for _ in range(2)]
        await tsp.swap_in(handles, out)
        assert (out[1] == payload(2)).all()
        await tsp.save_session("s", 0, list(range(16)), [payload(3)])
        assert [i.session_id for i in await tsp.list_sessions()] == ["s"]
        assert (await tsp.statistics()).sessions == 1

    trio.run(main)
