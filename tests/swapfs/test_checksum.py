import os

import numpy as np
import pytest

from tests.swapfs.conftest import LAYOUT, payload
from swapfs import checksum
from swapfs.errors import SwapConfigError
from swapfs.slot_store import SlotStore


def test_best_is_available_and_detects_a_flipped_bit():
    name = checksum.best()
    fn = checksum.get(name)
    data = payload(1)
    flipped = data.copy()
    flipped[12345] ^= 4
    assert fn(data) != fn(flipped) and 0 <= fn(data) < 1 << 64
    assert checksum.available("crc32")
    with pytest.raises(SwapConfigError, match="unknown"):
        checksum.get("md4")


def test_a_store_keeps_the_algorithm_it_was_formatted_with(swap_dir):
    path = os.path.join(swap_dir, "s.slots")
    st = SlotStore(path, LAYOUT.block_bytes, 2, layout_id=1, checksum_name="crc32")
    st.write([(0, 1, memoryview(payload(0)))])
    st.close()
    st = SlotStore(path, LAYOUT.block_bytes, 2, layout_id=1)     # no preference: keep crc32
    assert st.checksum_name == "crc32" and not st.reinitialized
    out = np.zeros(LAYOUT.block_bytes, np.uint8)
    assert st.read([(0, 1, memoryview(out))]) == [None]
    st.close()
