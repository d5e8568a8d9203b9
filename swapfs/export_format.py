"""The session export file (what `cp /mnt/sessions/ID/kv.bin` produces and what writing into
/mnt/import/NAME restores), its streaming reader and its streaming importer.

Layout (little-endian; every section starts at a multiple of 4096):
  0      magic "KVMMSES1" (8 bytes), json_len u32, crc32 of the JSON u32
  16     JSON, UTF-8: {"format": 1, "layout": {KVLayout fields}, "layout_id": int,
         "session_id", "owner_uid", "created", "num_tokens", "num_kv_tokens", "num_blocks",
         "block_bytes", "checksum": "xxh3_64" | "crc32c" | "crc32",
         "block_checksums": [checksum of each block, 16 hex digits]}
         zero padding to header_len = roundup(16 + json_len, 4096)
  header_len              token ids, int32 × num_tokens, zero padding to a 4096 multiple
  header_len + tokens_len block i (block_bytes each, the block as a slot holds it), i < num_blocks
An import is untrusted: besides its sections' sizes and checksums, every header field,
token id and KV value is checked (import_check.py) before it is committed; the owner
becomes the importing user and the session id the file's name under /import.

Prior art: safetensors (JSON header + raw tensors). Left out: compression, partial imports.
"""
from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Sequence

import numpy as np

from iosched.aligned_buffer import ALIGN, AlignedBuffer, round_up
from swapfs import checksum
from swapfs.errors import SwapConfigError, SwapFormatError
from swapfs.import_check import ImportCheck, ImportPolicy, ImportRejected
from swapfs.layout import KVLayout
from swapfs.records import SessionInfo, SlotRef

MAGIC = b"KVMMSES1"
_FIXED = struct.Struct("<8sII")
_MAX_JSON = 64 << 20
_STAGE_BLOCKS = 8   # blocks gathered before one staged write


def build_preamble(layout: KVLayout, info: SessionInfo, checksums: Sequence[int],
                   algorithm: str) -> bytes:
    """Header and token section of the export of `info` (the blocks follow). Its length
    does not depend on the checksum values (fixed-width hex), so sizes need no slot reads."""
    meta = {"format": 1, "layout": json.loads(layout.to_json()), "layout_id": layout.layout_id,
            "session_id": info.session_id, "owner_uid": info.owner_uid, "created": info.created,
            "num_tokens": info.num_tokens, "num_kv_tokens": info.num_kv_tokens,
            "num_blocks": info.num_blocks, "block_bytes": layout.block_bytes,
            "checksum": algorithm, "block_checksums": [f"{c:016x}" for c in checksums]}
    text = json.dumps(meta, separators=(",", ":")).encode()
    head = _FIXED.pack(MAGIC, len(text), zlib.crc32(text)) + text
    tokens = np.asarray(info.token_ids, dtype="<i4").tobytes()
    return (head.ljust(round_up(len(head), ALIGN), b"\0")
            + tokens.ljust(round_up(len(tokens), ALIGN), b"\0"))


class ExportReader:
    """Random-access reads of an export (or of one raw prefix block: empty preamble) over a
    pinned Snapshot. Blocking (call from a thread); keeps the last block read, so a
    sequential reader reads each slot once. Not thread-safe: one per open file."""

    def __init__(self, space, refs: Sequence[SlotRef], preamble: bytes = b"") -> None:
        self.space, self.refs, self.preamble = space, tuple(refs), preamble
        self.block_bytes = space.layout.block_bytes
        self.size = len(preamble) + len(self.refs) * self.block_bytes
        self._buf: AlignedBuffer | None = None
        self._cached = -1

    def read(self, offset: int, size: int) -> bytes:
        out = []
        end = min(self.size, offset + size)
        while offset < end:
            if offset < len(self.preamble):
                piece = self.preamble[offset:end]
            else:
                i, within = divmod(offset - len(self.preamble), self.block_bytes)
                block = self._block(i)
                piece = bytes(block[within:within + end - offset])
            out.append(piece)
            offset += len(piece)
        return b"".join(out)

    def _block(self, i: int) -> memoryview:
        if self._buf is None:
            self._buf = AlignedBuffer(self.block_bytes)
        view = self._buf.view[:self.block_bytes]
        if self._cached != i:
            self._cached = -1
            error = self.space.read_refs([self.refs[i]], [view])[0]
            if error is not None:
                raise error
            self._cached = i
        return view

    def close(self) -> None:
        if self._buf is not None:
            self._buf.close()
            self._buf = None


class SessionImporter:
    """Consumes an export file written sequentially and stages its blocks into slots as they
    arrive (memory: at most _STAGE_BLOCKS blocks); `finish()` validates and commits.
    Invariants: `received` bytes were accepted; `meta` is set once the header is complete,
    `tokens` once the token section is (then `_phase` is "blocks");
    `staged` are slots written for blocks [0, len(staged)) and not yet committed."""

    def __init__(self, space, session_id: str, owner_uid: int,
                 policy: ImportPolicy | None = None) -> None:
        self.space, self.session_id, self.owner_uid = space, session_id, owner_uid
        self.check = ImportCheck(space.layout, policy or ImportPolicy(), f"import of {session_id!r}")
        self.block_bytes = space.layout.block_bytes
        self.received = 0
        self.meta: dict | None = None
        self.tokens: list[int] | None = None
        self.staged: list[SlotRef] = []
        self._pending = bytearray()         # bytes of the current section not yet consumed
        self._phase = "fixed"               # fixed -> json -> tokens -> blocks
        self._need = _FIXED.size            # bytes that complete the current section
        self._batch: AlignedBuffer | None = None
        self._batched = 0
        self.done = False

    @property
    def total(self) -> int | None:
        if self.meta is None:
            return None
        return self._header_len + self._tokens_len + self.meta["num_blocks"] * self.block_bytes

    def write(self, offset: int, data: bytes) -> int:
        if offset != self.received:
            raise SwapFormatError(f"import of {self.session_id!r}: write at {offset}, expected"
                                  f" {self.received}; copy the export file sequentially (cp)")
        if self.total is not None and self.received + len(data) > self.total:
            raise SwapFormatError(f"import of {self.session_id!r}: data beyond the {self.total}"
                                  " bytes the header announces")
        view = memoryview(data)
        while view:
            if self._phase == "blocks":
                view = self._take_blocks(view)
                continue
            take = min(len(view), self._need - len(self._pending))
            self._pending += view[:take]
            view = view[take:]
            if len(self._pending) == self._need:
                self._section_done()
        self.received += len(data)
        return len(data)

    def _section_done(self) -> None:
        """The current section (`_phase`) is complete in `_pending`: parse, move on."""
        if self._phase == "fixed":
            magic, json_len, _crc = _FIXED.unpack(self._pending)
            if magic != MAGIC or json_len > _MAX_JSON:
                raise SwapFormatError(f"import of {self.session_id!r}: not a kvmm session export"
                                      " (bad magic); copy a sessions/ID/kv.bin file")
            self._phase, self._need = "json", round_up(_FIXED.size + json_len, ALIGN)
        elif self._phase == "json":
            self._parse_header(bytes(self._pending))
            self._pending = bytearray()
            self._phase, self._need = "tokens", self._tokens_len
            if self._need == 0:
                self.tokens, self._phase = [], "blocks"
        else:
            assert self._phase == "tokens"
            n = self.meta["num_tokens"]
            self.tokens = np.frombuffer(bytes(self._pending[:4 * n]), dtype="<i4").tolist()
            self.check.tokens(self.tokens)
            self._pending = bytearray()
            self._phase = "blocks"

    def _parse_header(self, head: bytes) -> None:
        _magic, json_len, crc = _FIXED.unpack_from(head)
        text = head[_FIXED.size:_FIXED.size + json_len]
        where = f"import of {self.session_id!r}"
        if zlib.crc32(text) != crc:
            raise SwapFormatError(f"{where}: header checksum mismatch (file damaged)")
        try:
            meta = json.loads(text)
        except ValueError as exc:
            raise ImportRejected(where, "header", f"is not JSON ({exc})") from None
        self.check.header(meta)
        try:
            layout = KVLayout(**meta["layout"])
            nblocks, nkv, ntok = meta["num_blocks"], meta["num_kv_tokens"], meta["num_tokens"]
            crcs = [int(c, 16) for c in meta["block_checksums"]]
            fn = checksum.get(meta["checksum"])
        except SwapConfigError as exc:
            raise ImportRejected(where, "checksum", f"is not usable ({exc})") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise SwapFormatError(f"{where}: header is not valid ({exc})") from None
        if layout != self.space.layout:
            raise SwapFormatError(f"{where}: exported for {layout}, this swap space holds"
                                  f" {self.space.layout}; import it into a daemon running that"
                                  " model")
        if not (isinstance(ntok, int) and 0 <= nkv <= ntok and len(crcs) == nblocks
                and nblocks == layout.blocks_for(nkv)):
            raise SwapFormatError(f"{where}: inconsistent counts (tokens {ntok}, kv tokens"
                                  f" {nkv}, blocks {nblocks}, checksums {len(crcs)})")
        self._header_len = len(head)
        self._tokens_len = round_up(4 * ntok, ALIGN)
        self.meta = meta
        self._crcs = crcs
        self._checksum = fn

    def _take_blocks(self, view: memoryview) -> memoryview:
        if self._batch is None:
            self._batch = AlignedBuffer(_STAGE_BLOCKS * self.block_bytes)
        pos = self._batched % self.block_bytes
        room = self.block_bytes - pos
        index = len(self.staged) + self._batched // self.block_bytes
        if index >= self.meta["num_blocks"]:
            raise SwapFormatError(f"import of {self.session_id!r}: more blocks than announced")
        start = self._batched
        take = min(room, len(view))
        self._batch.view[start:start + take] = view[:take]
        self._batched += take
        if self._batched % self.block_bytes == 0:
            block = self._batch.view[start + take - self.block_bytes:start + take]
            if self._checksum(block) != self._crcs[index]:
                raise SwapFormatError(f"import of {self.session_id!r}: block {index} checksum"
                                      " mismatch (file damaged)")
            self.check.block(index, block)
            if self._batched == _STAGE_BLOCKS * self.block_bytes:
                self._flush()
        return view[take:]

    def _flush(self) -> None:
        n = self._batched // self.block_bytes
        assert n * self.block_bytes == self._batched
        if n:
            bb = self.block_bytes
            views = [self._batch.view[i * bb:(i + 1) * bb] for i in range(n)]
            self.staged += self.space.stage_blocks(views)
            del views
        self._batched = 0

    def finish(self) -> SessionInfo:
        """Validate completeness and commit the session. Raises SwapFormatError and
        the SwapSpace errors; call `abort()` after any error."""
        if self.total is None or self.received != self.total or self.tokens is None:
            raise SwapFormatError(f"import of {self.session_id!r}: file ends after"
                                  f" {self.received} bytes, the export has {self.total or '?'};"
                                  " copy the whole kv.bin")
        self._flush()
        info = self.space.commit_staged_session(self.session_id, self.owner_uid, self.tokens,
                                                self.meta["num_kv_tokens"], self.staged,
                                                created=self.meta.get("created"))
        self.staged = []
        self.done = True
        self.close()
        return info

    def abort(self) -> None:
        if self.staged:
            self.space.discard_staged(self.staged)
            self.staged = []
        self.close()

    def close(self) -> None:
        if self._batch is not None:
            self._batch.close()
            self._batch = None
