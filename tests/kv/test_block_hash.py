import os
import subprocess
import sys

import numpy as np
import pytest

from kvmm_daemon.kv.block_hash import DIGEST_SIZE, hash_block, hash_full_blocks


def test_pinned_encoding():
    # The prefix cache on flash outlives the process: a change of encoding must be deliberate
    # (bump the tag in block_hash.py and this value together).
    assert hash_block(None, [1, 2, 3], "m").hex() == (
        "e2b4c3835df6dd788d490074a994c2874d9089f7cb1bc88206fcba79eaf67d50")


def test_every_input_matters():
    base = hash_block(None, [1, 2, 3, 4], "smollm2")
    assert len(base) == DIGEST_SIZE
    assert hash_block(None, [1, 2, 3, 4], "smollm2") == base
    others = {
        hash_block(None, [1, 2, 4, 3], "smollm2"),
        hash_block(None, [1, 2, 3], "smollm2"),
        hash_block(None, [1, 2, 3, 4], "smollm2-q8"),
        hash_block(b"\0" * 32, [1, 2, 3, 4], "smollm2"),
        hash_block(base, [1, 2, 3, 4], "smollm2"),
    }
    assert base not in others and len(others) == 5


def test_no_ambiguity_between_model_id_and_tokens():
    assert hash_block(None, [1], "a") != hash_block(None, [1], "a\0")
    assert hash_block(None, [256], "m") != hash_block(None, [0, 1], "m")


def test_numpy_and_python_ints_agree():
    assert hash_block(None, np.arange(5, dtype=np.int64), "m") == hash_block(None, range(5), "m")


def test_full_blocks_chain():
    toks = list(range(37))
    hs = hash_full_blocks(toks, 16, "m")
    assert len(hs) == 2
    assert hs[0] == hash_block(None, toks[:16], "m")
    assert hs[1] == hash_block(hs[0], toks[16:32], "m")
    # continuing from a parent equals hashing the whole list
    assert hash_full_blocks(toks[16:], 16, "m", parent=hs[0]) == hs[1:]
    assert hash_full_blocks(toks[:15], 16, "m") == []


def test_bad_inputs():
    with pytest.raises(ValueError, match="token id -1"):
        hash_block(None, [3, -1], "m")
    with pytest.raises(ValueError, match="token id"):
        hash_block(None, [1 << 32], "m")
    with pytest.raises(ValueError, match="parent hash"):
        hash_block(b"short", [1], "m")
    with pytest.raises(ValueError, match="block_size"):
        hash_full_blocks([1, 2], 0, "m")


_CHILD = """
import sys
from kvmm_daemon.kv.block_hash import hash_full_blocks
print(",".join(h.hex() for h in hash_full_blocks(list(range(100, 164)), 16, "SmolLM2-135M")))
"""


@pytest.mark.parametrize("seed", ["0", "12345"])
def test_same_hashes_in_another_process(seed):
    env = dict(os.environ, PYTHONHASHSEED=seed)
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, check=True,
                         capture_output=True, text=True).stdout.strip()
    mine = [h.hex() for h in hash_full_blocks(list(range(100, 164)), 16, "SmolLM2-135M")]
    assert out.split(",") == mine
