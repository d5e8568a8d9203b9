import numpy as np
import pytest

from swapfs.xxh3_native import Xxh3Native

xxhash = pytest.importorskip("xxhash")
NATIVE, WHY = Xxh3Native.load()
needs_native = pytest.mark.skipif(NATIVE is None, reason=f"no native xxh3: {WHY}")


@needs_native
@pytest.mark.parametrize("size", [0, 1, 16, 17, 128, 129, 240, 241, 4096, 737280, 1 << 20 | 3])
def test_one_buffer_matches_the_package(size):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    want = xxhash.xxh3_64_intdigest(data)
    assert NATIVE.digest(data) == want
    assert NATIVE.digest(data.tobytes()) == want
    view = memoryview(data.tobytes())                # read-only
    assert NATIVE.digest(view) == want


@needs_native
def test_pieces_hash_as_their_concatenation():
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, 737280, dtype=np.uint8)
    for cuts in ([24576 * i for i in range(1, 30)], [1, 2, 300, 4097, 700000], []):
        pieces = np.split(data, cuts)
        pieces = [memoryview(p) for p in pieces if len(p)]
        assert NATIVE.digest_pieces(pieces) == xxhash.xxh3_64_intdigest(data)


@needs_native
def test_non_contiguous_buffers_are_refused():
    data = np.zeros((64, 64), np.uint8)[:, ::2]
    with pytest.raises((ValueError, BufferError)):
        NATIVE.digest(data)
