import pytest
import torch

from iosched.aligned_buffer import is_direct_io_capable
from kvmm_daemon.errors import ConfigError
from kvmm_daemon.kv.kv_cache import KVCache

SMOL = dict(num_layers=30, block_size=16, num_kv_heads=3, head_dim=64)   # SmolLM2-135M
SMALL = dict(num_layers=3, block_size=4, num_kv_heads=2, head_dim=8)


@pytest.mark.parametrize("g", [1, 3])
def test_arena_shape_zeroed_and_contiguous(g):
    c = KVCache(5, layers_per_piece=g, **SMALL)
    assert c.kv.shape == (3 // g, 5, g, 2, 4, 2, 8) and c.kv.is_contiguous()
    assert KVCache(5, **SMALL).layers_per_piece == 3                 # block-major by default
    assert c.kv.dtype == torch.float32 and c.kv.device.type == "cpu"
    assert not c.kv.any()
    assert c.block_bytes == 3 * 2 * 4 * 2 * 8 * 4 and c.nbytes == 5 * c.block_bytes
    assert c.layer_block_bytes == c.block_bytes // 3
    assert c.huge_page_fraction() is not None


@pytest.mark.parametrize("g", [1, 3])
def test_layer_views_alias_the_arena(g):
    c = KVCache(5, layers_per_piece=g, **SMALL)
    k, v = c.layer(1)
    assert k.shape == v.shape == (5, 4, 2, 8)
    assert k.stride() == (g * 2 * 4 * 2 * 8, 16, 8, 1)  # blocks g layers apart
    k[2, 3, 1, 5] = 7.0
    v[4, 0, 0, 0] = -1.0
    assert c.kv[1 // g, 2, 1 % g, 0, 3, 1, 5] == 7.0 and c.kv[1 // g, 4, 1 % g, 1, 0, 0, 0] == -1.0
    assert c.layer(1)[0] is k                         # the same views every step
    # a layer's blocks lie within num_blocks * piece_bytes of each other
    last = c.layer(2)[1]
    assert last[4].data_ptr() + c.layer_block_bytes // 2 - c.layer(2)[0][0].data_ptr() == \
        4 * c.piece_bytes + c.layer_block_bytes


def test_copy_blocks_copies_every_layer_in_order():
    c = KVCache(4, **SMALL)
    for b in range(4):
        c.kv[:, b] = float(b + 1)
    c.copy_blocks([(0, 1), (1, 2), (3, 3)])           # sequential: 2 receives 1's new content
    assert [c.kv[:, b].unique().tolist() for b in range(4)] == [[1.0], [1.0], [1.0], [4.0]]
    with pytest.raises(IndexError):
        c.copy_blocks([(0, 4)])


@pytest.mark.parametrize("g", [1, 3, 30])
def test_block_pieces_are_the_blocks_bytes_layer_by_layer(g):
    c = KVCache(3, dtype="bfloat16", layers_per_piece=g, **SMOL)
    pieces = c.block_pieces(1)
    assert len(pieces) == 30 // g and all(len(p) == c.piece_bytes == g * 12288 for p in pieces)
    assert sum(len(p) for p in pieces) == c.block_bytes == 368640
    for i, piece in enumerate(pieces):                # swap-in writes through the pieces
        piece[:] = bytes([i + 1]) * len(piece)
    assert not c.kv[:, 0].any() and not c.kv[:, 2].any()
    # the concatenation is the block in swapfs's order [layers, 2, block, kv_heads, head_dim]
    block = b"".join(bytes(p) for p in pieces)
    layer = 12288
    for l in (0, 5, 29):
        k, v = c.layer(l)
        assert block[l * layer:(l + 1) * layer] == k[1].contiguous().view(torch.uint8).numpy().tobytes() + \
            v[1].contiguous().view(torch.uint8).numpy().tobytes()
    # pieces of a page-multiple size in a 2 MiB-aligned arena: O_DIRECT-ready
    assert all(is_direct_io_capable(p) for p in pieces)
    with pytest.raises(IndexError):
        c.block_pieces(3)


def test_sizing_from_a_budget():
    per = KVCache.bytes_per_block(dtype="float32", **SMOL)
    assert per == 30 * 2 * 16 * 3 * 64 * 4
    assert KVCache.num_blocks_for_budget(10 * per + per - 1, dtype="float32", **SMOL) == 10
    assert KVCache.num_blocks_for_budget(0, dtype=torch.float16, **SMOL) == 0
    assert KVCache.check_budget(64 << 20, max_model_len=1456, dtype="float32", **SMOL) == 91


def test_too_small_budget_names_the_fix():
    with pytest.raises(ConfigError) as e:
        KVCache.check_budget(64 << 20, max_model_len=4096, dtype="float32", **SMOL)
    msg = str(e.value)
    assert msg.startswith("KV budget of 64 MiB holds 91 blocks")
    assert "fewer than the 256 one sequence of max_model_len 4096 needs" in msg
    assert msg.endswith("raise --kv-budget or lower --max-model-len") and "\n" not in msg


def test_from_budget_allocates_the_largest_arena():
    per = KVCache.bytes_per_block(dtype="float32", **SMALL)
    c = KVCache.from_budget(7 * per + 5, max_model_len=9, **SMALL)
    assert c.num_blocks == 7 and c.nbytes <= 7 * per + 5


def test_bad_layout():
    with pytest.raises(ConfigError, match="layers_per_piece 2 must divide the model's 3 layers"):
        KVCache(1, layers_per_piece=2, **SMALL)
    with pytest.raises(ConfigError, match="kv_dtype 'int8'"):
        KVCache(1, dtype="int8", **SMALL)
    with pytest.raises(ValueError, match="num_blocks"):
        KVCache(0, **SMALL)


def test_lock_pins_the_arena():
    # a 2 MiB arena is within the usual 8 MiB RLIMIT_MEMLOCK (and root has CAP_IPC_LOCK);
    # a refusal's message is tested with the allocator (tests/iosched/test_aligned_buffer.py)
    c = KVCache(4, **SMALL)
    assert c.lock() and c.locked and c.lock_error is None
