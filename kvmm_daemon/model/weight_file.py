"""WeightFile: the model's weights laid out for streaming from flash.

Written once per machine (`kvmm weights prepare`, or on first use of a model whose weight
budget is below its size) in the daemon's state directory, it holds every weight in the
exact form the forward multiplies (see weight_segments.py; the LM head of a Q8_0 table as its
Q8_0 blocks, which the q8_0 mode multiplies as they are), so reading a segment needs no
conversion, with one exception: a segment with a `form` (the LM head's chunks of a Q8_0 table
asked for in bfloat16, --linear-mode bfloat16) holds its Q8_0 blocks, 8.5 bits a weight, and
`SegmentRecord.expand` turns them in place into the bfloat16 weight after the read (~0.1 ms per
2 MiB, native); its region in memory is then `memory_nbytes`, larger than the bytes read. The
int4 packing follows this CPU's vector width, so the file is keyed by the
model's content hash, torch's version and the CPU capability torch dispatches to; another
key is another file.

Layout (all offsets and lengths of data regions are multiples of 4 KiB, for O_DIRECT):
    [0, 8)        magic b"KVMMWGT1"
    [8, 16)       u64 length L of the JSON header
    [16, 24)      u64 xxh3_64 of the JSON header
    [24, 24+L)    JSON header: key, segments (offset, nbytes, xxh3_64, meta, form,
                  memory_nbytes, tensor records of the memory form relative to the segment's
                  region), the final norm, the embedding table's row records
    ...           padding to 4 KiB, then each segment at a 4 KiB boundary in step order,
                  then the final norm, then the embedding rows (record r at r*record_bytes)
The file is written to a temporary name, fsynced, and renamed into place (then the directory
is fsynced), so a crash or a full disk never leaves a half-written file under the real name.
Prior art: llama.cpp's GGUF (aligned tensor data after a self-describing header), PowerInfer-2's
offline weight layout. Left out: compression, and per-read checksums on the hot path (every
segment is verified when the file is opened; a mismatch rebuilds the file).
"""
from __future__ import annotations

import json
import os
import platform
import struct
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import xxhash

from kernels import q8_0
from kvmm_daemon.errors import ConfigError, WeightFileError
from kvmm_daemon.model.weight_segments import ModelWeights, segment_parts
from kvmm_daemon.sizes import format_size

MAGIC = b"KVMMWGT1"
LAYOUT_VERSION = 3          # 2: the LM head of a Q8_0 table stored as Q8_0 blocks; 3: and
                            # multiplied from them (mode q8_0, no expansion) under "auto"
ALIGN = 4096
TENSOR_ALIGN = 64
_PREFIX = struct.Struct("<8sQQ")
_DTYPES = {str(d).removeprefix("torch."): d for d in
           (torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.uint8, torch.int32)}


def _round_up(n: int, align: int) -> int:
    return -(-n // align) * align


def model_fingerprint(path: str | os.PathLike) -> str:
    """xxh3-128 of the model's bytes (every file of a safetensors directory, by name). The
    pages read are dropped from the page cache afterwards (a budgeted daemon should not
    leave 100s of MiB of cache charged to its cgroup)."""
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    h = xxhash.xxh3_128()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as src:
            while chunk := src.read(8 << 20):
                h.update(chunk)
            os.posix_fadvise(src.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return h.hexdigest()


def _identity(path: Path) -> str:
    """What changes whenever a file's content can have: inode, size, mtime (of every file)."""
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    return ";".join(f"{f.name}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}" for f in files
                    for st in [f.stat()])


def cached_fingerprint(path: str | os.PathLike, state_dir: str | os.PathLike | None) -> str:
    """model_fingerprint, remembered in state_dir/model-hashes.json by the files' identity
    (inode, size, mtime), so a restart does not read the whole model again."""
    p = Path(path).resolve()
    if state_dir is None:
        return model_fingerprint(p)
    cache = Path(state_dir) / "model-hashes.json"
    ident = _identity(p)
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    entry = known.get(str(p))
    if isinstance(entry, dict) and entry.get("identity") == ident:
        return entry["hash"]
    digest = model_fingerprint(p)
    known[str(p)] = {"identity": ident, "hash": digest}
    try:
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known))
        os.replace(tmp, cache)
    except OSError:
        pass        # a read-only state dir: hash again next time
    return digest


def weight_key(model_path: str | os.PathLike, linear_mode: str,
               state_dir: str | os.PathLike | None = None) -> dict:
    """What a weight file must match to be used: the model's content, the int4 packing's
    dependencies (torch version, CPU capability) and the layout version."""
    return {"model_hash": cached_fingerprint(model_path, state_dir), "torch": torch.__version__,
            "cpu": f"{platform.machine()}:{torch.backends.cpu.get_cpu_capability()}",
            "linear_mode": linear_mode, "layout": LAYOUT_VERSION}


def weight_file_path(state_dir: str | os.PathLike, model_path: str | os.PathLike, key: dict) -> Path:
    tag = xxhash.xxh3_64_hexdigest(json.dumps(key, sort_keys=True).encode())
    return Path(state_dir) / f"{Path(model_path).stem}-{tag}.kvw"


@dataclass(frozen=True, slots=True)
class TensorRecord:
    key: str
    dtype: str
    shape: tuple[int, ...]
    offset: int       # within its region
    nbytes: int

    def view(self, region: torch.Tensor) -> torch.Tensor:
        """This tensor over `region` (a uint8 tensor holding the region's bytes), no copy."""
        raw = region[self.offset:self.offset + self.nbytes]
        return raw.view(_DTYPES[self.dtype]).view(self.shape)


@dataclass(frozen=True, slots=True)
class SegmentRecord:
    """One segment's place in the file and in memory.

    nbytes bytes are read (`padded` with the 4 KiB rounding) into a region of `region_bytes`;
    `tensors` are the memory form's tensors within that region. form None: the bytes read are
    the memory form (memory_nbytes == nbytes). form "q8_0": they are Q8_0 blocks, turned in
    place into the memory form (memory_nbytes > nbytes) by `expand`, once per read.
    """

    name: str
    offset: int       # in the file, 4 KiB aligned
    nbytes: int       # data bytes; the region read is `padded` bytes
    checksum: int     # xxh3_64 of the nbytes read
    meta: dict
    tensors: tuple[TensorRecord, ...]
    form: str | None = None
    memory_nbytes: int = 0

    @property
    def padded(self) -> int:
        return _round_up(self.nbytes, ALIGN)

    @property
    def region_bytes(self) -> int:
        """Bytes the segment occupies in memory (pinned, or in a window slot)."""
        return _round_up(max(self.nbytes, self.memory_nbytes), ALIGN)

    def expand(self, region: torch.Tensor) -> None:
        """Turn the bytes just read into `region` (uint8, >= region_bytes) into the memory
        form; nothing to do for a segment stored as it is used. Not idempotent: once per read."""
        if self.form == "q8_0":
            q8_0.expand_to_bf16_(region[:self.region_bytes], self.nbytes // q8_0.IN_BYTES)
        elif self.form is not None:
            raise WeightFileError(f"segment {self.name} has the unknown form {self.form!r}; "
                                  f"run: kvmm weights prepare")

    def tensor_views(self, region: torch.Tensor) -> dict[str, torch.Tensor]:
        return {t.key: t.view(region) for t in self.tensors}


@dataclass(frozen=True, slots=True)
class EmbeddingRecord:
    """The embedding table as row records: record r (`record_bytes` at offset +
    r*record_bytes) is row r of each part (q, then d, m), back to back."""

    ggml_type: str
    rows: int
    offset: int
    record_bytes: int
    parts: tuple[TensorRecord, ...]   # offset = within a record, shape = one row's shape
    checksum: int

    @property
    def nbytes(self) -> int:
        return self.rows * self.record_bytes


def _records(tensors: dict[str, torch.Tensor]) -> tuple[list[TensorRecord], int]:
    out, pos = [], 0
    for key, t in tensors.items():
        pos = _round_up(pos, TENSOR_ALIGN)
        nbytes = t.numel() * t.element_size()
        out.append(TensorRecord(key, str(t.dtype).removeprefix("torch."), tuple(t.shape), pos, nbytes))
        pos += nbytes
    return out, pos


def _tensor_bytes(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()


def _pack(records: list[TensorRecord], tensors: dict[str, torch.Tensor], nbytes: int) -> np.ndarray:
    buf = np.zeros(_round_up(nbytes, ALIGN), np.uint8)
    for r in records:
        buf[r.offset:r.offset + r.nbytes] = _tensor_bytes(tensors[r.key])
    return buf


class WeightFile:
    """An opened weight file's header (the data is read by whoever holds `fd`).

    Attributes (fixed after open): path; key; segments (SegmentRecord in step order, their
    file ranges disjoint and ascending); output_norm (a SegmentRecord holding one tensor);
    embedding (EmbeddingRecord); lm_head_chunks; size (file bytes).
    """

    def __init__(self, path: Path, header: dict, size: int) -> None:
        self.path = path
        self.key = header["key"]
        self.lm_head_chunks = int(header["lm_head_chunks"])
        self.segments = [_segment_record(s) for s in header["segments"]]
        self.output_norm = _segment_record(header["output_norm"])
        e = header["embedding"]
        self.embedding = EmbeddingRecord(e["ggml_type"], e["rows"], e["offset"], e["record_bytes"],
                                         tuple(_tensor_record(p) for p in e["parts"]), e["checksum"])
        self.size = size
        end = max([s.offset + s.padded for s in self.segments] + [self.embedding.offset + self.embedding.nbytes])
        if end > size:
            raise WeightFileError(f"weight file {path} is truncated ({size} of {end} bytes); "
                                  f"it will be rebuilt (or run: kvmm weights prepare)")

    @property
    def model_bytes(self) -> int:
        """Bytes a step reads when nothing is resident: every segment (the embedding rows a
        step needs are a few pages and not counted)."""
        return sum(s.nbytes for s in self.segments)

    @property
    def memory_bytes(self) -> int:
        """Bytes every segment's region takes when all are resident."""
        return sum(s.region_bytes for s in self.segments)

    @classmethod
    def open(cls, path: str | os.PathLike, key: dict | None = None) -> WeightFile:
        path = Path(path)
        try:
            with open(path, "rb") as f:
                magic, length, checksum = _PREFIX.unpack(f.read(_PREFIX.size))
                if magic != MAGIC:
                    raise WeightFileError(f"{path} is not a kvmm weight file (bad magic); remove it "
                                          f"or run: kvmm weights prepare")
                raw = f.read(length)
                size = os.fstat(f.fileno()).st_size
        except (OSError, struct.error) as e:
            raise WeightFileError(f"cannot read weight file {path}: {e}") from None
        if len(raw) != length or xxhash.xxh3_64_intdigest(raw) != checksum:
            raise WeightFileError(f"weight file {path} has a corrupt header; it will be rebuilt "
                                  f"(or run: kvmm weights prepare)")
        header = json.loads(raw)
        if key is not None and header["key"] != key:
            raise WeightFileError(f"weight file {path} was made for another model, torch or CPU "
                                  f"({header['key']} != {key}); run: kvmm weights prepare")
        return cls(path, header, size)


def _tensor_record(d: dict) -> TensorRecord:
    return TensorRecord(d["key"], d["dtype"], tuple(d["shape"]), d["offset"], d["nbytes"])


def _segment_record(d: dict) -> SegmentRecord:
    return SegmentRecord(d["name"], d["offset"], d["nbytes"], d["checksum"], d["meta"],
                         tuple(_tensor_record(t) for t in d["tensors"]), d.get("form"),
                         d.get("memory_nbytes", d["nbytes"]))


def _record_dict(r: TensorRecord) -> dict:
    return {"key": r.key, "dtype": r.dtype, "shape": list(r.shape), "offset": r.offset, "nbytes": r.nbytes}


Progress = Callable[[int, int, str], None]


def write_weight_file(weights: ModelWeights, path: str | os.PathLike, key: dict, *,
                      progress: Progress | None = None) -> WeightFile:
    """Convert the model segment by segment and write the weight file atomically.

    Raises ConfigError naming the directory and the fix when it is read-only or full; nothing
    is left behind under either name."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise ConfigError(f"cannot write the weight file in {path.parent}: {e.strerror}; make the "
                          f"state directory writable or point --state-dir elsewhere") from None
    try:
        with os.fdopen(fd, "wb") as f:
            header = _write_body(weights, f, key, progress)
            raw = json.dumps(header, separators=(",", ":")).encode()
            head = _PREFIX.pack(MAGIC, len(raw), xxhash.xxh3_64_intdigest(raw)) + raw
            if len(head) > header["data_start"]:
                raise AssertionError("header outgrew its reserved space")
            f.seek(0)
            f.write(head)
            f.flush()
            os.fsync(f.fileno())
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)   # leave no page cache behind
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise ConfigError(f"writing the weight file {path} failed: {e.strerror}; free "
                              f"space in {path.parent} or point --state-dir elsewhere") from None
        raise
    return WeightFile.open(path, key)


def _write_body(weights: ModelWeights, f, key: dict, progress: Progress | None) -> dict:
    ids = weights.segment_ids()
    reserve = _round_up(64 * 1024 + 2048 * len(ids), ALIGN)   # header space, generously
    pos = reserve
    segments = []
    for n, (sid, segment, flash) in enumerate(weights.stored_segments()):
        meta, tensors = segment_parts(segment)
        records, memory_nbytes = _records(tensors)
        if flash is None:
            nbytes, buf = memory_nbytes, _pack(records, tensors, memory_nbytes)
        else:
            nbytes = flash.data.numel()
            buf = np.zeros(_round_up(nbytes, ALIGN), np.uint8)
            buf[:nbytes] = _tensor_bytes(flash.data)
        f.seek(pos)
        f.write(buf.data)
        segments.append({"name": sid.name, "offset": pos, "nbytes": nbytes,
                         "checksum": xxhash.xxh3_64_intdigest(buf[:nbytes].data), "meta": meta,
                         "form": None if flash is None else flash.kind,
                         "memory_nbytes": memory_nbytes,
                         "tensors": [_record_dict(r) for r in records]})
        pos += len(buf)
        if progress:
            progress(n + 1, len(ids), sid.name)
    norm = {"output_norm": weights.output_norm()}
    records, nbytes = _records(norm)
    buf = _pack(records, norm, nbytes)
    f.seek(pos)
    f.write(buf.data)
    output_norm = {"name": "output_norm", "offset": pos, "nbytes": nbytes,
                   "checksum": xxhash.xxh3_64_intdigest(buf[:nbytes].data), "meta": {},
                   "tensors": [_record_dict(r) for r in records]}
    pos += len(buf)
    emb = weights.embedding()
    parts = emb.row_parts()
    rows = [_tensor_bytes(p).reshape(emb.num_embeddings, -1) for p in parts]
    table = np.concatenate(rows, axis=1)
    part_records, at = [], 0
    for p, r in zip(parts, rows):
        part_records.append(TensorRecord("", str(p.dtype).removeprefix("torch."), tuple(p.shape[1:]),
                                         at, r.shape[1]))
        at += r.shape[1]
    f.seek(pos)
    f.write(table.data)
    f.truncate(_round_up(pos + table.nbytes, ALIGN))
    embedding = {"ggml_type": emb.ggml_type, "rows": emb.num_embeddings, "offset": pos,
                 "record_bytes": table.shape[1], "parts": [_record_dict(r) for r in part_records],
                 "checksum": xxhash.xxh3_64_intdigest(table.data)}
    return {"format": "kvmm-weights", "key": key, "data_start": reserve,
            "lm_head_chunks": weights.lm_head_chunks, "segments": segments,
            "output_norm": output_norm, "embedding": embedding}


def print_progress(done: int, total: int, name: str) -> None:
    """A one-line progress bar on stderr (redrawn on a terminal, every 10% otherwise)."""
    width = 30
    filled = width * done // total
    line = f"preparing weights [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {name}"
    if sys.stderr.isatty():
        print("\r" + line, end="\n" if done == total else "", file=sys.stderr, flush=True)
    elif done == total or done * 10 // total != (done - 1) * 10 // total:
        print(line, file=sys.stderr, flush=True)


def describe(wf: WeightFile) -> str:
    return (f"{wf.path}: {len(wf.segments)} segments, {format_size(wf.model_bytes)} streamed form, "
            f"embedding {wf.embedding.rows} rows x {wf.embedding.record_bytes} B")
