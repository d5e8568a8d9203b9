"""Imported sessions are untrusted (issue 8, item 2): every field is checked and a bad one
is refused with an error naming it; nothing of a refused import stays on flash."""
from __future__ import annotations

import numpy as np
import pytest

from swapfs.export_format import SessionImporter
from swapfs.import_check import ImportPolicy, ImportRejected
from tests.security.forge import finite_block, forge, honest_meta
from tests.swapfs.conftest import LAYOUT

POLICY = ImportPolicy(vocab_size=320, max_tokens=255)
TOKENS = list(range(1, 21))            # 20 tokens, 2 blocks of 16


def _import(space, data: bytes, policy=POLICY):
    imp = SessionImporter(space, "forged", 1000, policy)
    try:
        imp.write(0, data)
        return imp.finish()
    except BaseException:
        imp.abort()
        raise


def _blocks(n=2):
    return [finite_block(LAYOUT, i) for i in range(n)]


def test_an_honest_file_is_accepted_and_owned_by_the_importer(space):
    info = _import(space, forge(honest_meta(LAYOUT, TOKENS, 20), TOKENS, _blocks()))
    assert info.owner_uid == 1000 and info.token_ids == tuple(TOKENS)


def _nan_block():
    b = np.frombuffer(finite_block(LAYOUT, 9), np.float32).copy()
    b[123] = np.nan
    return b.tobytes()


def _inf_block():
    b = np.frombuffer(finite_block(LAYOUT, 9), np.float32).copy()
    b[-1] = -np.inf
    return b.tobytes()


CASES = {
    "format": (lambda m: m.update(format=2), TOKENS, None, "format"),
    "model id": (lambda m: m["layout"].update(model_id="other"), TOKENS, None, "layout.model_id"),
    "block size": (lambda m: m["layout"].update(block_size=8), TOKENS, None, "layout.block_size"),
    "dtype": (lambda m: m["layout"].update(dtype="float16"), TOKENS, None, "layout.dtype"),
    "layers": (lambda m: m["layout"].update(num_layers=True), TOKENS, None, "layout.num_layers"),
    "extra layout key": (lambda m: m["layout"].update(evil=1), TOKENS, None, "layout.evil"),
    "layout id": (lambda m: m.update(layout_id=1), TOKENS, None, "layout_id"),
    "unknown key": (lambda m: m.update(exec="rm -rf /"), TOKENS, None, "'exec'"),
    "missing key": (lambda m: m.pop("num_blocks"), TOKENS, None, "num_blocks"),
    "owner": (lambda m: m.update(owner_uid=-5), TOKENS, None, "owner_uid"),
    "created": (lambda m: m.update(created="yesterday"), TOKENS, None, "created"),
    "negative count": (lambda m: m.update(num_tokens=-1), TOKENS, None, "num_tokens"),
    "too long": (lambda m: m.update(num_tokens=10_000), TOKENS, None, "num_tokens"),
    "kv > tokens": (lambda m: m.update(num_kv_tokens=21, num_blocks=2), TOKENS, None, "num_kv_tokens"),
    "block count": (lambda m: m.update(num_blocks=3), TOKENS, None, "num_blocks"),
    "block bytes": (lambda m: m.update(block_bytes=64), TOKENS, None, "block_bytes"),
    "checksums": (lambda m: m.update(block_checksums=["zz"] * 2), TOKENS, None, "block_checksums[0]"),
    "checksum kind": (lambda m: m.update(checksum="md5"), TOKENS, None, "checksum"),
    "negative token": (None, TOKENS[:5] + [-1] + TOKENS[6:], None, "token_ids[5]"),
    "token beyond vocab": (None, TOKENS[:19] + [320], None, "token_ids[19]"),
    "nan in kv": (None, TOKENS, [finite_block(LAYOUT), _nan_block()], "block 1"),
    "inf in kv": (None, TOKENS, [_inf_block(), finite_block(LAYOUT)], "block 0"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_bad_field_is_refused_by_name(space, case):
    mutate, tokens, blocks, field = CASES[case]
    meta = honest_meta(LAYOUT, tokens, 20)
    if mutate is not None:
        mutate(meta)
    free = space.statistics().free_slots
    with pytest.raises(ImportRejected) as err:
        _import(space, forge(meta, tokens, blocks or _blocks()))
    assert err.value.field == field, str(err.value)
    assert f"field {field}" in str(err.value)
    assert space.statistics().free_slots == free and space.list_sessions() == []
