"""StreamingWeightPool: the weights under a hard byte budget, streamed from flash.

Everything the pool holds sits in one huge-page arena of `WeightPlan.arena_bytes` <= the
budget, locked in memory (MLOCK_ONFAULT) when RLIMIT_MEMLOCK allows: the pinned segments,
the window's slots, the scratch the embedding rows are read into, and the final norm. The
weights come from the prepared weight file (weight_file.py), read with O_DIRECT through
iosched in the forward's exact form (the LM head of a Q8_0 table as its Q8_0 blocks, which
the q8_0 mode multiplies as they are), but for a Q8_0 head asked for in bfloat16, whose chunks
are expanded in place (in their slot after each read, or once in their pinned region): there
is no scratch, and a slot is sized by the largest segment's memory form. The file's checksums are
verified on open. The forward sees the surface of weight_pool.ResidentWeightPool; `embed`
marks the start of a step, for the per-step figures (bytes read, stall, step time).
"""
from __future__ import annotations

import logging
import os
import time

import torch
import xxhash

from iosched.aligned_buffer import ALIGN, AlignedBuffer
from iosched.request import Priority
from iosched.errors import IOSchedError
from kvmm_daemon.errors import ConfigError, WeightFileError, WeightReadError
from kvmm_daemon.model import quant_linear as ql
from kvmm_daemon.model.spec import ModelSpec
from kvmm_daemon.model.step_trace import StepTrace
from kvmm_daemon.model.weight_file import SegmentRecord, WeightFile
from kvmm_daemon.model.weight_plan import WeightPlan
from kvmm_daemon.model.weight_pool import WeightPoolStats
from kvmm_daemon.model.weight_segments import LayerWeights, Segment, segment_from_parts
from kvmm_daemon.model.weight_stream import StreamWindow
from kvmm_daemon.sizes import format_size

log = logging.getLogger("kvmm.weights")

EMBED_SCRATCH = 256 * 1024     # bytes of the buffer embedding rows are read into


class StreamingWeightPool:
    """Attributes and invariants:
        plan: the WeightPlan; arena.nbytes == plan.arena_bytes <= budget_bytes.
        pinned: {segment index: Segment over the arena} for plan.resident, built once.
        window: the StreamWindow over plan.streamed (None when every segment is pinned).
        output_norm: a view into the arena.
        The forward's segment accesses go to `pinned` or `window`, never both for one index.
    """

    def __init__(self, wf: WeightFile, spec: ModelSpec, io, *, budget_bytes: int,
                 linear_mode: str = "auto", window: int = 0, verify: bool = True) -> None:
        self.wf = wf
        self.spec = spec
        self.io = io
        self.budget_bytes = budget_bytes
        self.linear_mode = linear_mode
        records = wf.segments
        emb = wf.embedding
        self._scratch_bytes = min(EMBED_SCRATCH, _round_up(emb.nbytes, ALIGN) + 2 * ALIGN)
        fixed = self._scratch_bytes + wf.output_norm.padded
        self.fd = _open_direct(wf.path)
        self.window_reason = f"configured ({window})"
        if window <= 0:
            window, self.window_reason = self._measure_window(records)
        self.plan = WeightPlan.make([r.nbytes for r in records], budget_bytes, fixed_bytes=fixed,
                                    window=window, memory=[r.region_bytes for r in records])
        self.arena = AlignedBuffer(self.plan.arena_bytes, huge_pages=self.plan.huge_pages)
        self.lock_error = None if self.arena.lock() else self.arena.lock_error
        if self.lock_error:
            log.warning("weight pool not locked in memory: %s", self.lock_error)
        raw = torch.frombuffer(self.arena.view, dtype=torch.uint8)
        pos = 0

        def region(nbytes: int) -> tuple[memoryview, torch.Tensor]:
            nonlocal pos
            n = -(-nbytes // ALIGN) * ALIGN
            out = (self.arena.view[pos:pos + n], raw[pos:pos + n])
            pos += n
            return out

        self._slots = [region(self.plan.slot_bytes) for _ in range(self.plan.window if self.plan.streamed else 0)]
        self._scratch = region(self._scratch_bytes)
        norm_view, norm_t = region(wf.output_norm.padded)
        self._read(wf.output_norm, norm_view, verify)
        self.output_norm = wf.output_norm.tensor_views(norm_t)["output_norm"]
        self.pinned: dict[int, Segment] = {}
        for i, rec in enumerate(records):
            if i in self.plan.resident:
                view, t = region(rec.region_bytes)
                self._read(rec, view, verify)
                rec.expand(t)
                self.pinned[i] = segment_from_parts(rec.meta, rec.tensor_views(t))
            elif verify:
                self._read(rec, self._slots[0][0], verify)
        if verify:
            self._verify_embedding()
        assert pos <= self.arena.nbytes
        self._pos_of = {idx: n for n, idx in enumerate(self.plan.streamed)}
        self.window = (StreamWindow(io, self.fd, [records[i] for i in self.plan.streamed], self._slots,
                                    lambda rec, t: segment_from_parts(rec.meta, rec.tensor_views(t)))
                       if self.plan.streamed else None)
        self._steps = 0
        self._embed_bytes = 0
        self.trace = StepTrace(len(records))
        log.info("weight pool: %s budget, %d of %d segments pinned (%s), %d streamed through %d slots "
                 "(%s read per step); window %s", format_size(budget_bytes), len(self.plan.resident),
                 len(records), format_size(self.plan.resident_bytes), len(self.plan.streamed),
                 self.plan.window, format_size(self.plan.streamed_bytes), self.window_reason)

    # --- loading -----------------------------------------------------------------------------

    def _measure_window(self, records: list[SegmentRecord]) -> tuple[int, str]:
        """Window slots from measured times: a segment's read (its bytes at the device
        profile's bandwidth) against its compute (the largest layer's matmuls on one token,
        timed here on a copy read once). Compute-bound: one read in flight hides the next.
        I/O-bound: enough in flight to keep the device's queue full (queue depth x request
        size, from the profile), at most 3: each slot more is a segment less pinned."""
        prof = self.io.profile
        rec = max((r for r in records if "linears" in r.meta), key=lambda r: r.nbytes, default=None)
        if rec is None or not prof.read_bandwidth:
            return 3, "default (no device bandwidth measured)"
        with AlignedBuffer(rec.padded, huge_pages=False) as tmp:
            self.io.read(self.fd, rec.offset, tmp.view[:rec.padded], priority=Priority.WEIGHT_READ)
            layer = segment_from_parts(rec.meta, rec.tensor_views(torch.frombuffer(tmp.view, dtype=torch.uint8)))
            linears = [getattr(layer, n) for n in ("qkv", "o", "gate_up", "down")]
            xs = [torch.zeros(1, lin.in_features) for lin in linears]
            best = float("inf")
            for _ in range(5):
                t0 = time.perf_counter()
                for lin, x in zip(linears, xs):
                    lin(x)
                best = min(best, time.perf_counter() - t0)
            del layer, linears
        t_io = rec.padded / prof.read_bandwidth
        if t_io <= best:
            return 2, f"compute-bound (read {t_io * 1e3:.2f} ms <= compute {best * 1e3:.2f} ms per layer)"
        depth = max(1, min(3, -(-prof.queue_depth * prof.request_bytes // rec.padded)))
        return 1 + depth, (f"I/O-bound (read {t_io * 1e3:.2f} ms > compute {best * 1e3:.2f} ms per layer): "
                           f"{depth} in flight fill the device queue")

    def _read(self, rec: SegmentRecord, view: memoryview, verify: bool) -> None:
        """Read a segment into `view` (O_DIRECT); with verify, check its checksum."""
        self.io.read(self.fd, rec.offset, view[:rec.padded], priority=Priority.WEIGHT_READ)
        if verify and xxhash.xxh3_64_intdigest(view[:rec.nbytes]) != rec.checksum:
            raise WeightFileError(f"weight file {self.wf.path}: segment {rec.name} fails its "
                                  f"checksum; the file is corrupt and will be rebuilt")

    def _verify_embedding(self) -> None:
        emb = self.wf.embedding
        view = self._scratch[0]
        h = xxhash.xxh3_64()
        for at in range(0, emb.nbytes, len(view)):
            n = min(len(view), emb.nbytes - at)
            self.io.read(self.fd, emb.offset + at, view[:-(-n // ALIGN) * ALIGN], priority=Priority.WEIGHT_READ)
            h.update(view[:n])
        if h.intdigest() != emb.checksum:
            raise WeightFileError(f"weight file {self.wf.path}: the embedding table fails its "
                                  f"checksum; the file is corrupt and will be rebuilt")

    # --- the forward's surface ---------------------------------------------------------------

    def _segment(self, idx: int) -> Segment:
        t = self.trace.asked()
        seg = self.pinned.get(idx)
        if seg is None:   # the stall ends when the read lands; an expansion after it is compute
            return self.window.get(self._pos_of[idx], landed=lambda: self.trace.got(idx, t))
        self.trace.got(idx, None)
        return seg

    def layer(self, i: int) -> LayerWeights:
        return self._segment(i)

    def _head_chunks(self):
        base = self.spec.num_layers
        for c in range(self.wf.lm_head_chunks):
            yield self._segment(base + c)

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        try:
            return ql.lm_head_logits(hidden, self._head_chunks())
        finally:
            if self.window is not None:
                self.window.release()

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Rows of the tokens asked for, read from flash (the start of a step)."""
        self._begin_step()
        ids = token_ids.reshape(-1).long()
        emb = self.wf.embedding
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= emb.rows):
            raise ValueError(f"token id out of range 0..{emb.rows - 1}")
        uniq, inverse = torch.unique(ids, return_inverse=True)
        records = self._read_rows(uniq.tolist())
        parts = []
        for p in emb.parts:
            raw = records[:, p.offset:p.offset + p.nbytes].contiguous()
            parts.append(raw.view(getattr(torch, p.dtype)).reshape(len(uniq), *p.shape))
        table = ql.QuantEmbedding.from_row_parts(emb.ggml_type, parts)
        return table(inverse).reshape(*token_ids.shape, -1)

    def _read_rows(self, rows: list[int]) -> torch.Tensor:
        """The records of `rows` (sorted, distinct) as uint8 [len(rows), record_bytes]."""
        emb = self.wf.embedding
        rb = emb.record_bytes
        out = torch.empty((len(rows), rb), dtype=torch.uint8)
        view, raw = self._scratch
        cap = len(view)
        i = 0
        while i < len(rows):
            # pages covering rows[i:j] (merged where they touch), as many as fit the scratch
            runs: list[list[int]] = []     # [file start, file end, scratch offset], ascending
            run_of: list[int] = []         # run_of[k - i]: the run holding rows[k]
            used, j = 0, i
            while j < len(rows):
                lo = (emb.offset + rows[j] * rb) // ALIGN * ALIGN
                hi = -(-(emb.offset + (rows[j] + 1) * rb) // ALIGN) * ALIGN
                if runs and lo <= runs[-1][1]:
                    grow = max(0, hi - runs[-1][1])
                    if used + grow > cap:
                        break
                    runs[-1][1] = max(runs[-1][1], hi)
                    used += grow
                else:
                    if used + hi - lo > cap:
                        break
                    runs.append([lo, hi, used])
                    used += hi - lo
                run_of.append(len(runs) - 1)
                j += 1
            reqs = [self.io.submit_read(self.fd, lo, view[at:at + hi - lo], priority=Priority.WEIGHT_READ)
                    for lo, hi, at in runs]
            try:
                for r in reqs:
                    self.io.wait(r)
            except IOSchedError as e:
                for r in reqs:
                    _wait_quietly(self.io, r)
                raise WeightReadError(f"reading weights (embedding rows) failed: {e}; this step's "
                                      f"requests fail, the next step reads again") from None
            self._embed_bytes += used
            for k in range(i, j):
                run = runs[run_of[k - i]]
                at = run[2] + emb.offset + rows[k] * rb - run[0]
                out[k] = raw[at:at + rb]
            i = j
        return out

    # --- accounting ----------------------------------------------------------------------------

    def _totals(self) -> tuple[int, float]:
        if self.window is None:
            return self._embed_bytes, 0.0
        return self.window.read_bytes + self._embed_bytes, sum(self.window.stall_s)

    def _begin_step(self) -> None:
        self.trace.begin_step(self._totals()[0])
        self._steps += 1

    def statistics(self) -> WeightPoolStats:
        read, stall = self._totals()
        stalls = self.window.stall_s if self.window is not None else []
        per = [{"name": r.name, "resident": i in self.pinned, "bytes": r.nbytes,
                "stall_s": round(stalls[self._pos_of[i]], 6) if i in self._pos_of else 0.0}
               for i, r in enumerate(self.wf.segments)]
        last = self.trace.last()
        last_step = ({"bytes_read": last.bytes_read, "stall_s": round(sum(last.stall_s), 6),
                      "compute_s": round(sum(last.compute_s), 6), "step_s": round(last.step_s, 6)}
                     if last is not None else {})
        return WeightPoolStats(
            self.budget_bytes, self.arena.nbytes, self.wf.model_bytes, self.linear_mode,
            self.spec.num_layers, streaming=True, window=self.plan.window,
            pinned_bytes=self.plan.resident_bytes, streamed_bytes_per_step=self.plan.streamed_bytes,
            locked=self.lock_error is None, lock_error=self.lock_error, steps=self._steps,
            bytes_read=read, stall_s=stall, last_step=last_step, per_segment=per)

    def close(self) -> None:
        """Idempotent: drains the window and closes the file (the I/O scheduler is the
        engine's)."""
        if self.fd is None:
            return
        if self.window is not None:
            self.window.close()
        os.close(self.fd)
        self.fd = None


def _wait_quietly(io, request) -> None:
    try:
        io.wait(request, promote=False)
    except IOSchedError:
        pass


def _round_up(n: int, align: int) -> int:
    return -(-n // align) * align


def _open_direct(path) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError(f"cannot open the weight file {path} with O_DIRECT ({e.strerror}); put "
                          f"the state directory on a disk file system (not tmpfs): --state-dir") from None
