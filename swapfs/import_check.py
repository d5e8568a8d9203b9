"""ImportCheck: an imported session export is untrusted input, checked field by field.

Anyone who may write the view's import/ directory can hand the daemon a file; its header,
token ids and KV bytes become a session the engine computes on. Checksums inside the file
prove nothing (the writer made them), so before anything is committed every field is
checked against this swap space and this model: the format, each layout field (model id,
layer count, block size, KV heads, head dim, dtype) and the layout id, the counts
(tokens within the model's context, KV tokens, blocks, block bytes, one checksum per
block), every token id within the vocabulary, and every KV value finite (NaN or Inf in one
block would spread into every logit computed over it). The first violation raises
`ImportRejected` naming the field; the view turns it into EINVAL and logs that line.
Unknown header keys are refused too (a field nobody checks is a field an attacker picks).

Left out: plausibility of the KV values beyond finiteness (a forged but finite KV is
possible; it stays usable only by its importer: sessions are owned, prefix chains salted).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from swapfs.errors import SwapFormatError
from swapfs.layout import KVLayout

_HEADER_KEYS = {"format", "layout", "layout_id", "session_id", "owner_uid", "created",
                "num_tokens", "num_kv_tokens", "num_blocks", "block_bytes", "checksum",
                "block_checksums"}
# bit pattern of an all-ones exponent (NaN/Inf) for dtypes numpy cannot test directly
_EXPONENT_MASK = {"bfloat16": (np.uint16, 0x7F80)}


class ImportRejected(SwapFormatError):
    """An import that fails a check; `field` names what was wrong."""

    kind = "import_rejected"

    def __init__(self, where: str, field: str, why: str) -> None:
        super().__init__(f"{where}: field {field} {why}; the file is refused")
        self.field = field


@dataclass(frozen=True, slots=True)
class ImportPolicy:
    """What the model behind the swap space accepts: token ids in 0..vocab_size-1, at most
    max_tokens tokens of history (None = no check, e.g. the stand-alone mount)."""

    vocab_size: int | None = None
    max_tokens: int | None = None


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class ImportCheck:
    """Checks for one import into a swap space of `layout` under `policy`."""

    def __init__(self, layout: KVLayout, policy: ImportPolicy, where: str) -> None:
        self.layout, self.policy, self.where = layout, policy, where

    def _reject(self, field: str, why: str) -> ImportRejected:
        return ImportRejected(self.where, field, why)

    def header(self, meta: object) -> None:
        """The JSON header, before any of it is used."""
        if not isinstance(meta, dict):
            raise self._reject("header", "is not a JSON object")
        for key in sorted(meta.keys() - _HEADER_KEYS):
            raise self._reject(repr(key), "is not part of the export format")
        for key in sorted(_HEADER_KEYS - meta.keys() - {"created"}):
            raise self._reject(key, "is missing")
        if meta["format"] != 1:
            raise self._reject("format", f"= {meta['format']!r}, only format 1 is known")
        self._layout(meta["layout"])
        if meta["layout_id"] != self.layout.layout_id:
            raise self._reject("layout_id", f"= {meta['layout_id']!r} does not match the layout")
        if not isinstance(meta["session_id"], str):
            raise self._reject("session_id", "is not a string")
        if not _is_int(meta["owner_uid"]) or meta["owner_uid"] < 0:
            raise self._reject("owner_uid", f"= {meta['owner_uid']!r} is not a uid")
        created = meta.get("created")
        if created is not None and (not isinstance(created, (int, float)) or isinstance(created, bool)
                                    or not math.isfinite(created) or created < 0):
            raise self._reject("created", f"= {created!r} is not a time")
        self._counts(meta)

    def _layout(self, given: object) -> None:
        if not isinstance(given, dict):
            raise self._reject("layout", "is not a JSON object")
        want = {f: getattr(self.layout, f) for f in KVLayout.__dataclass_fields__}
        for key in sorted(given.keys() - want.keys()):
            raise self._reject(f"layout.{key}", "is not a layout field")
        for key, value in want.items():
            if given.get(key) != value or type(given.get(key)) is not type(value):
                raise self._reject(f"layout.{key}", f"= {given.get(key)!r}, this daemon's swap "
                                   f"space holds {value!r}; import it into a daemon running that model")

    def _counts(self, meta: dict) -> None:
        ntok, nkv, nblocks = meta["num_tokens"], meta["num_kv_tokens"], meta["num_blocks"]
        limit = self.policy.max_tokens
        if not _is_int(ntok) or ntok < 0 or (limit is not None and ntok > limit):
            raise self._reject("num_tokens", f"= {ntok!r} is not in 0..{limit if limit is not None else 'any'}"
                               " (the model's context)")
        if not _is_int(nkv) or not 0 <= nkv <= ntok:
            raise self._reject("num_kv_tokens", f"= {nkv!r} is not in 0..num_tokens ({ntok})")
        if not _is_int(nblocks) or nblocks != self.layout.blocks_for(nkv):
            raise self._reject("num_blocks", f"= {nblocks!r}, {nkv} KV tokens fill "
                               f"{self.layout.blocks_for(nkv)}")
        if meta["block_bytes"] != self.layout.block_bytes:
            raise self._reject("block_bytes", f"= {meta['block_bytes']!r}, the layout's blocks "
                               f"have {self.layout.block_bytes}")
        crcs = meta["block_checksums"]
        if not isinstance(crcs, list) or len(crcs) != nblocks:
            raise self._reject("block_checksums", f"must list {nblocks} checksums")
        for i, c in enumerate(crcs):
            if not isinstance(c, str) or len(c) != 16 or not all(ch in "0123456789abcdef" for ch in c):
                raise self._reject(f"block_checksums[{i}]", f"= {c!r} is not 16 hex digits")
        if not isinstance(meta["checksum"], str):
            raise self._reject("checksum", "is not an algorithm name")

    def tokens(self, token_ids: list[int]) -> None:
        """Every token id within the vocabulary (a negative or too large id would make the
        engine index outside its embedding table)."""
        vocab = self.policy.vocab_size
        for i, t in enumerate(token_ids):
            if t < 0 or (vocab is not None and t >= vocab):
                raise self._reject(f"token_ids[{i}]", f"= {t} is outside the vocabulary "
                                   f"0..{vocab - 1 if vocab is not None else '2**31'}")

    def block(self, index: int, data) -> None:
        """Every KV value of block `index` finite."""
        dtype = self.layout.dtype
        raw = np.frombuffer(data, dtype=np.uint8)
        if dtype in _EXPONENT_MASK:
            as_int, mask = _EXPONENT_MASK[dtype]
            bad = (raw.view(as_int) & mask) == mask
        elif dtype.startswith("float") and hasattr(np, dtype):
            bad = ~np.isfinite(raw.view(np.dtype(dtype)))
        else:
            return               # integer and float8 layouts: every bit pattern is a value
        if bad.any():
            raise self._reject(f"block {index}", f"holds {int(bad.sum())} values that are not "
                               "finite (NaN or Inf)")
