"""SlotStore: a preallocated file of fixed-size, checksummed slots read and written with
O_DIRECT in large batched requests from a few threads.

File layout (little-endian):
  [superblock, 4 KiB][slot 0][slot 1]...   slot i at SUPER + i * stride
  slot   = [header, 4 KiB][payload, padded to 4 KiB]
  header = magic "KVMMSLOT", layout_id u64, slot_id u32, generation u64, payload_len u32,
           payload checksum u64, header crc32 u32 (over the bytes before it)
The superblock names the payload checksum algorithm (swapfs.checksum; the store keeps the
one it was formatted with while that stays importable).
A read verifies magic, layout, slot id, the generation the caller expects, the length and
both checksums before a payload counts as data, so a torn write, a slot overwritten since
its metadata was committed, or bit rot raises `SlotCorruptError` instead of being served.

Requests go through an iosched.IOScheduler (passed in, or one of `io_threads` in flight and
`max_request`-byte transfers made and owned by the store; $KVMM_IOSCHED_BACKEND picks its
backend, default "auto"): a batch cuts its items into runs of
consecutive slots of up to the scheduler's request size and submits each run as ONE vectored
request ([header, payload pieces..., header, payload pieces...]), so a run costs one wait
(and one syscall per 256 buffers). A payload is a `BlockBuffer`: one range or several (the
engine's layer-major arena gives one piece per layer) whose concatenation is the slot's
payload; a plain buffer is one piece.
A write hashes a run and fills in its headers (`_seal_run`), submits it, and hashes the next
while the device works, so the queue holds hashed runs whenever a wave of transfers ends
(`submit_write` returns with them in flight; `finish_write` waits). A read submits all its
runs in one `IOScheduler.batch()`, each with an on_done hook that verifies it as soon as it
has landed (`_check_run`), in the I/O backend's thread after it has given the device its
next transfers: at the I/O threads' raised priority, while later runs are read, and with the
caller's thread asleep instead of holding the GIL the dispatcher needs (on this shared 2-core
VM it was often preempted holding it). With the system's libxxhash the checksum itself runs
with the GIL released (swapfs.checksum), so the dispatcher goes on while a write's runs are
hashed; with the xxhash package the writer yields after each submission. A slot read counts
only once verified, and the transfers in flight land together (this VM's disk
ends 8 reads of 4 MiB all at ~16 ms), so whatever lands last is verified after the last
byte has come. Read runs therefore shrink toward the end of a batch: a run is at most 1/depth
of the slots still to read (depth = the scheduler's queue depth) and is not merged with its
neighbours, so each wave of transfers in flight is a fixed fraction of what remains and the
last one, the only verification that overlaps no read, is a few slots (64 slots at depth 8
and 4 MiB requests go in waves of 39, 19 and 6). Reads go at Priority.KV_SWAP_IN and writes
at KV_WRITE_BACK unless the caller says otherwise. Payloads whose pieces are all 4 KiB
aligned in address and length (and fill the slot's padded payload area) go to the kernel as
they are (zero copy); others are gathered into / scattered from huge-page bounce scratch.
Slot headers and bounce areas are lent per batch by a ScratchPool.
Durability is the caller's: `sync()` is fdatasync, to be called before committing metadata.

Prior art: Linux swap's slot map, vLLM's CPU swap space, s3ql's block cache; the block
layer's data integrity (bio_integrity: protection generated at submission, verified in a
workqueue at completion). Left out: compression, more than one file.
"""
from __future__ import annotations

import errno
import fcntl
import functools
import os
import struct
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from iosched import DeviceProfile, IOReadError, IOScheduler, IOWriteError, Priority
from iosched.aligned_buffer import ALIGN, AlignedBuffer, round_up
from swapfs import checksum
from swapfs.block_buffer import BlockBuffer
from swapfs.scratch_pool import ScratchPool
from swapfs.errors import (SlotCorruptError, SwapBusyError, SwapError, SwapIOError,
                           SwapNoSpaceError, from_os_error)

SUPER_BYTES = ALIGN
HEADER_BYTES = ALIGN
_SUPER = struct.Struct("<8sIQQQQ16s")  # magic, format, layout_id, payload_bytes, num_slots,
                                        # stride, checksum algorithm
_SUPER_MAGIC = b"KVMMSWP1"
_HEADER = struct.Struct("<8sQIQIQ")  # magic, layout_id, slot_id, generation, length, checksum
_HEADER_MAGIC = b"KVMMSLOT"
_CRC = struct.Struct("<I")
_LOCK_GRACE_S = 2.0


def slot_stride(payload_bytes: int) -> int:
    return HEADER_BYTES + round_up(payload_bytes, ALIGN)


@dataclass(eq=False)
class _Scratch:
    """One batch's I/O vectors: iov[heads[k]] is slot k's header page, followed by its
    payload (the item's pieces, or one bounce area) up to iov[heads[k + 1]]; heads has one
    entry per slot plus len(iov). areas[k] = (where slot k's payload lies, bounced?);
    borrowed: (kind, buffer) lent by the ScratchPool."""
    iov: list[memoryview] = field(default_factory=list)
    heads: list[int] = field(default_factory=list)
    areas: list[tuple[BlockBuffer, bool]] = field(default_factory=list)
    borrowed: list[tuple[str, AlignedBuffer]] = field(default_factory=list)


@dataclass(eq=False)
class PendingWrite:
    """A batch submitted to the scheduler and not yet finished (SlotStore.submit_write).

    requests: one vectored IORequest per run of consecutive slots; crcs: each payload's
    checksum, in item order (set as its run is hashed; unused by reads); scratch: its I/O
    vectors, None once returned to the pool (after every request ended); result: None until
    finish_write, then the checksums or the error.
    """
    scratch: _Scratch | None
    started: float
    requests: list = field(default_factory=list)
    crcs: list[int] = field(default_factory=list)
    result: list[int] | SwapError | None = None

    def done(self) -> bool:
        """Every request has ended: finish_write will not block."""
        return all(r.done() for r in self.requests)


class SlotStore:
    """One slot file. Thread-safe: batches may run concurrently from several threads.

    Attributes:
      path, payload_bytes, num_slots, stride: geometry; slot i lives at
        SUPER_BYTES + i * stride, and the file is exactly SUPER_BYTES + num_slots * stride.
      layout_id: written into the superblock and every header.
      checksum_name: the payload checksum algorithm (from the superblock; a new file gets the
        one asked for, else the best available).
      direct_io: the file is open with O_DIRECT (False only where the file system refuses it).
      reinitialized: the superblock did not match this geometry at open, so the file was
        formatted anew and no slot content from before may be trusted.
      scheduler: the IOScheduler every slot read/write goes through; _own_scheduler: made
        by this store (closed with it) rather than passed in.
      bytes_read / bytes_written / read_seconds / write_seconds: cumulative, under `_lock`.
      _pool: scratch (slot headers, bounce areas) lent to one batch until its I/O is over.
      _checksum: the payload checksum (of a BlockBuffer's pieces), run by the writer's thread
        (_seal_run) and the I/O backend's (_check_run); _hash_holds_gil: it keeps other
        threads waiting while it runs (swapfs.checksum.releases_gil).
    """

    def __init__(self, path: str, payload_bytes: int, num_slots: int, layout_id: int, *,
                 io_threads: int = 8,
                 max_request: int = 4 << 20, checksum_name: str | None = None,
                 scheduler: IOScheduler | None = None) -> None:
        assert payload_bytes > 0 and num_slots > 0
        self.path = path
        self.payload_bytes = payload_bytes
        self.num_slots = num_slots
        self.layout_id = layout_id
        self.checksum_name = checksum_name
        self.stride = slot_stride(payload_bytes)
        self.io_threads = io_threads
        self.file_bytes = SUPER_BYTES + num_slots * self.stride
        self.bytes_read = self.bytes_written = 0
        self.read_seconds = self.write_seconds = 0.0
        self._lock = threading.Lock()
        self._pool = ScratchPool()
        self.reinitialized = False
        self._fd = -1
        self._own_scheduler = scheduler is None
        self.scheduler: IOScheduler | None = scheduler
        try:
            self._open()
        except OSError as exc:
            self.close()
            raise from_os_error(exc, f"opening swap file {path}") from exc
        except SwapError:
            self.close()
            raise
        if self.scheduler is None:
            prof = DeviceProfile(queue_depth=io_threads, request_bytes=round_up(max_request, ALIGN),
                                 read_bandwidth=0.0, measured_on="swapfs default")
            self.scheduler = IOScheduler(profile=prof, name="swapfs", backend=os.environ.get("KVMM_IOSCHED_BACKEND", "auto"))

    # -- opening and formatting ----------------------------------------------------------

    def _open(self) -> None:
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        try:
            self._fd = os.open(self.path, flags | os.O_DIRECT, 0o600)
            self.direct_io = True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self._fd = os.open(self.path, flags, 0o600)  # e.g. an old tmpfs
            self.direct_io = False
        # A killed predecessor's io_uring is torn down asynchronously by the kernel and holds
        # the file (and so its lock) until its last request is reaped: give it a moment.
        deadline = time.monotonic() + _LOCK_GRACE_S
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.01)
                    continue
            raise SwapBusyError(f"swap file {self.path} is in use by another process; stop it or"
                                " give this one another --swap-dir") from None
        with AlignedBuffer(SUPER_BYTES, huge_pages=False) as sb:
            view = sb.view[:SUPER_BYTES]
            algorithm = None
            if os.fstat(self._fd).st_size == self.file_bytes and \
                    os.preadv(self._fd, [view], 0) == SUPER_BYTES:
                algorithm = self._match_super(bytes(view[:_SUPER.size + 4]))
            if algorithm is None:
                self.reinitialized = True
                algorithm = self.checksum_name or checksum.best()
                self._preallocate()
                want = self._super(algorithm)
                view[:] = bytes(SUPER_BYTES)
                view[:len(want)] = want
                os.pwritev(self._fd, [view], 0)
                os.fdatasync(self._fd)
            del view
        self.checksum_name = algorithm
        self._checksum = checksum.get_pieces(algorithm)
        self._hash_holds_gil = not checksum.releases_gil(algorithm)

    def _super(self, algorithm: str) -> bytes:
        head = _SUPER.pack(_SUPER_MAGIC, 1, self.layout_id, self.payload_bytes, self.num_slots,
                           self.stride, algorithm.encode())
        return head + _CRC.pack(zlib.crc32(head))

    def _match_super(self, have: bytes) -> str | None:
        """The checksum algorithm of a superblock that fits this geometry and whose algorithm
        is usable here (and is the one asked for, if any); None otherwise."""
        name = have[_SUPER.size - 16:_SUPER.size].rstrip(b"\0").decode(errors="replace")
        if self.checksum_name not in (None, name) or not checksum.available(name):
            return None
        return name if have == self._super(name) else None

    def _preallocate(self) -> None:
        """Truncate and allocate the whole file (through a buffered fd: glibc's fallback for
        file systems without fallocate writes unaligned bytes)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, 0)
            try:
                os.posix_fallocate(fd, 0, self.file_bytes)
            except OSError as exc:
                os.ftruncate(fd, 0)
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise SwapNoSpaceError(
                        f"cannot preallocate {self.file_bytes} bytes for {self.path}: no space"
                        " left; lower --swap-size or free space under --swap-dir") from None
                raise
        finally:
            os.close(fd)

    def close(self) -> None:
        if self.scheduler is not None:
            if self._own_scheduler:
                self.scheduler.close()
            self.scheduler = None
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            try:
                os.close(fd)
            except OSError:     # a dead device (ENOTCONN, EIO): the fd is released anyway
                pass
        self._pool.close()

    # -- batched I/O --------------------------------------------------------------------

    def write(self, items: Sequence[tuple[int, int, BlockBuffer | memoryview]], *,
              priority: Priority = Priority.KV_WRITE_BACK) -> list[int]:
        """Write (slot_id, generation, payload) items and wait; returns each payload's
        checksum in the order given. Not durable until `sync()`. Raises SwapNoSpaceError /
        SwapIOError."""
        return self.finish_write(self.submit_write(items, priority=priority))

    def submit_write(self, items: Sequence[tuple[int, int, BlockBuffer | memoryview]], *,
                     priority: Priority = Priority.KV_WRITE_BACK) -> PendingWrite:
        """Start writing (slot_id, generation, payload) items; the payloads must stay
        unchanged until `finish_write` returns. Each run of consecutive slots (up to a
        request's worth) is one vectored request, submitted as soon as its headers are
        hashed, so hashing overlaps the device's work; the first run is a single slot so
        the device starts after one checksum."""
        items = self._buffers(items, writable=False)
        pending = PendingWrite(self._lend(items), time.perf_counter(), crcs=[0] * len(items))
        if not items:
            return pending
        iov, heads = pending.scratch.iov, pending.scratch.heads
        sched = self.scheduler
        assert sched is not None, "SlotStore used after close()"
        try:
            for a, b in self._runs(items, first_alone=True):
                self._seal_run(items, pending.scratch, pending.crcs, a, b)
                pending.requests.append(sched.submit_writev(
                    self._fd, self._offset(items[a][0]), iov[heads[a]:heads[b]],
                    priority=priority))
                if self._hash_holds_gil:
                    time.sleep(0)   # let the backend's thread take it now (GIL) rather than
                                    # after the next switch interval, 5 ms of hashing later
        except BaseException:
            self._settle(pending, write=True)   # what went out must land before scratch goes
            raise
        return pending

    def finish_write(self, pending: PendingWrite) -> list[int]:
        """Wait for a submitted write; its checksums, or the first error (SwapIOError,
        SwapNoSpaceError) once every request of it has ended. Idempotent."""
        if pending.result is None:
            first = self._settle(pending, write=True)
            self._account(len(pending.crcs), time.perf_counter() - pending.started, write=True)
            pending.result = first if first is not None else pending.crcs
        if isinstance(pending.result, SwapError):
            raise pending.result
        return pending.result

    def read(self, items: Sequence[tuple[int, int, BlockBuffer | memoryview]], *,
             priority: Priority = Priority.KV_SWAP_IN) -> list[SwapError | None]:
        """Read (slot_id, expected generation, destination) items; returns per item None
        (destination holds the verified payload) or the SwapError that hit it (destination
        content undefined). Every run of consecutive slots is one vectored request (runs
        shrink toward the end: see the module docstring), all submitted at once; the I/O
        backend's thread verifies each run as soon as it has arrived, while the rest are
        still being read."""
        items = self._buffers(items, writable=True)
        if not items:
            return []
        t0 = time.perf_counter()
        pending = PendingWrite(self._lend(items), t0)    # the same bookkeeping, for reads
        iov, heads = pending.scratch.iov, pending.scratch.heads
        sched = self.scheduler
        assert sched is not None, "SlotStore used after close()"
        runs = self._runs(items, shrinking=True)
        results: list[SwapError | None] = [None] * len(items)
        try:
            with sched.batch():
                for a, b in runs:
                    pending.requests.append(sched.submit_readv(
                        self._fd, self._offset(items[a][0]), iov[heads[a]:heads[b]],
                        priority=priority, merge=False, on_done=functools.partial(
                            self._check_run, items, pending.scratch, results, a, b)))
        except BaseException:
            self._settle(pending, write=False)
            raise
        try:
            failed = [self._wait(req, write=False) for req in reversed(pending.requests)][::-1]
        finally:
            self._settle(pending, write=False)
        for (a, b), error in zip(runs, failed):
            if error is not None:
                results[a:b] = [error] * (b - a)
        first = next((e for e in failed if e is not None), None)
        self._account(len(items), time.perf_counter() - t0, write=False)
        if first is not None:
            raise first
        return results

    def sync(self) -> None:
        """fdatasync the slot file: every write returned so far is on stable storage."""
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            raise from_os_error(exc, f"syncing swap file {self.path}") from exc

    def _buffers(self, items, *, writable: bool) -> list[tuple[int, int, BlockBuffer]]:
        """The items with their payloads as BlockBuffers, checked: slot ids in range and
        distinct, payload lengths this store's."""
        out = []
        for slot_id, gen, payload in items:
            if not 0 <= slot_id < self.num_slots:
                raise IndexError(f"slot {slot_id} outside 0..{self.num_slots - 1}")
            buf = BlockBuffer.of(payload, writable=writable)
            if buf.nbytes != self.payload_bytes:
                raise ValueError(f"KV block buffer of {buf.nbytes} bytes, this swap space"
                                 f" stores blocks of {self.payload_bytes} bytes")
            out.append((slot_id, gen, buf))
        if len({slot_id for slot_id, _g, _v in out}) != len(out):
            raise ValueError("a batch names the same slot twice")
        return out

    def _account(self, n: int, seconds: float, *, write: bool) -> None:
        with self._lock:
            if write:
                self.bytes_written += n * self.payload_bytes
                self.write_seconds += seconds
            else:
                self.bytes_read += n * self.payload_bytes
                self.read_seconds += seconds

    def _offset(self, slot_id: int) -> int:
        return SUPER_BYTES + slot_id * self.stride

    def _runs(self, items, *, first_alone: bool = False,
              shrinking: bool = False) -> list[tuple[int, int]]:
        """[a, b) index ranges of items whose slots follow each other in the file, each at
        most a scheduler request's worth; the first one a single slot if `first_alone`; each
        at most 1/queue depth of the items from its start on (rounded up) if `shrinking`."""
        profile = self.scheduler.profile
        group = max(1, profile.request_bytes // self.stride)
        n = len(items)
        runs = []
        a = 0
        for k in range(1, n + 1):
            if shrinking and k - a == 1:
                group = min(group, -(-(n - a) // profile.queue_depth))
            if k == n or items[k][0] != items[k - 1][0] + 1 or k - a >= group or \
                    (first_alone and not runs):
                runs.append((a, k))
                a = k
        return runs

    def _wait(self, req, *, write: bool) -> SwapError | None:
        """Wait for one request; its failure as a SwapError (None when it succeeded)."""
        what = "writing" if write else "reading"
        try:
            self.scheduler.wait(req, promote=False)
            return None
        except (IOReadError, IOWriteError) as exc:
            if exc.errno is None:
                return SwapIOError(f"{what} swap file {self.path} at {req.offset}: short"
                                   " transfer (file truncated?); delete it to reformat")
            return from_os_error(OSError(exc.errno, os.strerror(exc.errno)),
                                 f"{what} swap file {self.path} at offset {req.offset}")

    def _settle(self, pending: PendingWrite, *, write: bool) -> SwapError | None:
        """Wait for every request of `pending`, then return its scratch to the pool; the
        first failure (None if none)."""
        first = unexpected = None
        for req in reversed(pending.requests):  # the last ends last: one wake-up, not one
            try:                                # per wave of transfers
                first = self._wait(req, write=write) or first
            except Exception as exc:        # a hook's bug: the rest must still end first
                unexpected = exc
        scratch, pending.scratch = pending.scratch, None
        if scratch is not None:
            for kind, buf in scratch.borrowed:
                self._pool.give_back(kind, buf)
        if unexpected is not None:
            raise unexpected
        return first

    def _lend(self, items) -> _Scratch:
        """Per slot: its header page and payload area (the caller's view when aligned, else
        a padded bounce area), in scratch borrowed from the pool for this batch."""
        scratch = _Scratch()
        padded = self.stride - HEADER_BYTES
        headers = bounce = None
        if items:
            headers = self._pool.borrow("headers", len(items) * HEADER_BYTES)
            scratch.borrowed.append(("headers", headers))
        for k, (_slot, _gen, buf) in enumerate(items):
            scratch.heads.append(len(scratch.iov))
            scratch.iov.append(headers.view[k * HEADER_BYTES:(k + 1) * HEADER_BYTES])
            if buf.nbytes == padded and buf.direct_io_capable():
                scratch.iov.extend(buf.pieces)
                scratch.areas.append((buf, False))
            else:
                if bounce is None:
                    bounce = self._pool.borrow("bounce", len(items) * padded)
                    scratch.borrowed.append(("bounce", bounce))
                area = bounce.view[k * padded:(k + 1) * padded]
                scratch.iov.append(area)
                scratch.areas.append((BlockBuffer([area[:buf.nbytes]]), True))
        scratch.heads.append(len(scratch.iov))
        return scratch

    def _seal_run(self, items, scratch: _Scratch, crcs: list[int], a: int, b: int) -> None:
        """Hash the payloads of write items [a, b) into crcs[k] and their headers (gather
        them into their bounce areas first, if any)."""
        for k in range(a, b):
            (slot_id, gen, payload), (_area, bounced) = items[k], scratch.areas[k]
            if bounced:
                padded = scratch.iov[scratch.heads[k] + 1]     # the bounce area, padded
                payload.gather_into(padded)
                padded[payload.nbytes:] = bytes(len(padded) - payload.nbytes)
            crcs[k] = self._checksum(payload.pieces)
            head = _HEADER.pack(_HEADER_MAGIC, self.layout_id, slot_id, gen, payload.nbytes,
                                crcs[k])
            hdr = scratch.iov[scratch.heads[k]]
            hdr[:_HEADER.size] = head
            hdr[_HEADER.size:_HEADER.size + 4] = _CRC.pack(zlib.crc32(head))

    def _check_run(self, items, scratch: _Scratch, results: list, a: int, b: int,
                   _request) -> None:
        """results[k] = None or the SlotCorruptError of read item k, for k in [a, b), whose
        bytes have landed (copied out of their bounce area when verified). The on_done of a
        read run: the I/O backend's thread runs it as soon as the run has landed, at the
        backend's raised priority and while the device reads the next runs, so the caller's
        thread sleeps through the batch (its Python would hold the GIL the backend needs)."""
        for k in range(a, b):
            (slot_id, gen, into), (area, bounced) = items[k], scratch.areas[k]
            header = bytes(scratch.iov[scratch.heads[k]][:_HEADER.size + 4])
            results[k] = self._verify(slot_id, gen, header, area.nbytes,
                                      self._checksum(area.pieces))
            if results[k] is None and bounced:
                into.scatter_from(area.pieces[0])

    def _verify(self, slot_id: int, gen: int, header: bytes, nbytes: int, payload_crc: int):
        magic, layout_id, got_slot, got_gen, length, crc = _HEADER.unpack_from(header)
        where = f"swap slot {slot_id} of {self.path}"
        if magic != _HEADER_MAGIC or _CRC.unpack_from(header, _HEADER.size)[0] != \
                zlib.crc32(header[:_HEADER.size]):
            return SlotCorruptError(f"{where}: header is not valid (torn or never written);"
                                    " the block will be recomputed")
        if layout_id != self.layout_id or got_slot != slot_id or length != nbytes:
            return SlotCorruptError(f"{where}: header belongs to another layout or slot;"
                                    " the block will be recomputed")
        if got_gen != gen:
            return SlotCorruptError(f"{where}: generation {got_gen}, expected {gen} (overwritten"
                                    " or torn); the block will be recomputed")
        if payload_crc != crc:
            return SlotCorruptError(f"{where}: payload checksum mismatch (torn write or bit rot);"
                                    " the block will be recomputed")
        return None
