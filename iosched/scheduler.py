"""IOScheduler: one queue of reads and writes for a device, served by a backend that keeps
`queue_depth` transfers in flight.

Callers submit (thread-safe, never blocking) and later wait. A request longer than the
profile's `request_bytes` is split into pieces that run in parallel; queued pieces of the
same op that continue each other in the same file are merged into one vectored syscall of at
most `request_bytes` (unless a request asks not to be: merge=False). A read may carry work
for the backend's thread: its on_done runs once its bytes have arrived, before it counts as
done (swapfs verifies its slots there: at the I/O threads' raised priority, while the device
works on the next transfers, and without the caller's thread, whose Python would hold the GIL
the backend needs). The queue is served strictly by (priority, deadline, FIFO); a wait on a
still-queued request promotes it to WEIGHT_READ, since someone is now blocked on it. A failed
or short transfer is resubmitted for its missing bytes `retries` times before its requests
fail with IOReadError/IOWriteError. Backends: io_uring (iosched.uring_backend, a small C ring
driven by one dispatcher thread) or vectored preadv/pwritev from worker threads
(iosched.preadv_backend); "auto" takes io_uring when its library loads and a ring can be made.

Prior art: Linux blk-mq (per-class queues, merging, splitting at max_sectors), the
deadline/mq-deadline elevators, PowerInfer-2's and "LLM in a flash"'s batched flash reads,
RocksDB's MultiRead. Left out: bandwidth shares between classes (strict priority is what the
weight pool needs: the forward waits on WEIGHT_READ), cancellation, more than one device.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from iosched.aligned_buffer import ALIGN, address_of
from iosched.device_profile import DeviceProfile
from iosched.errors import IOReadError, IOSchedError, IOWriteError
from iosched.io_stats import IOStats
from iosched.preadv_backend import PreadvBackend
from iosched.request import IORequest, Priority
from iosched.request_queue import RequestQueue
from iosched.transfer import Piece, Transfer

log = logging.getLogger("kvmm.iosched")

_MAX_IOV = 256          # buffers per vectored syscall (IOV_MAX is 1024)
_OPS = ("read", "write")


class IOScheduler:
    """Attributes (all under `_lock` unless said otherwise):
      name: thread-name and log prefix; profile: the DeviceProfile in use; retries: extra
        attempts of a failed/short transfer; backend: the backend object (fixed after init).
      backend_reason: why this backend was chosen.
      _queue: pieces not yet taken by the backend.
      _outstanding: pieces queued or in flight, or whose request's on_done has yet to run;
        drain() waits for 0.
      _arrived: requests whose bytes have all arrived and whose on_done has not been started
        (a backend thread runs it: _run_hooks).
      _in_flight[op]: transfers of op taken and not finished; _busy_since[op]: when
        _in_flight[op] last went 0 -> 1 (None iff it is 0); _busy[op]: closed busy seconds.
      _paused: while True the backend takes nothing (a test seam; see _pause).
      _closing: close() began; submits are refused; backends exit once the queue is empty.
      _seq: next piece sequence number (FIFO order); _completed: requests completed so far.
      The remaining _counters are the statistics, each the sum its IOStats field documents.
    """

    def __init__(self, *, backend: str = "auto", profile: DeviceProfile | None = None,
                 retries: int = 2, name: str = "io") -> None:
        if backend not in ("auto", "io_uring", "preadv"):
            raise ValueError(f"unknown I/O backend {backend!r}; use 'auto', 'io_uring' or 'preadv'")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        self.name = name
        self.profile = profile or DeviceProfile.default()
        self.retries = retries
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._queue = RequestQueue()
        self._outstanding = 0
        self._arrived: list[IORequest] = []
        self._in_flight = {op: 0 for op in _OPS}
        self._busy_since: dict[str, float | None] = {op: None for op in _OPS}
        self._busy = {op: 0.0 for op in _OPS}
        self._bytes = {op: 0 for op in _OPS}
        self._paused = False
        self._closing = False
        self._closed = False
        self._seq = 0
        self._completed = 0
        self._bytes_by_prio = {p.name: 0 for p in Priority}
        self._reqs_by_prio = {p.name: 0 for p in Priority}
        self._max_in_flight = self._merges = self._splits = self._retried = 0
        self._errors = self._syscalls = 0
        self._wait_seconds = 0.0
        self.thread_priority = ""            # set by the backend's threads as they start
        self.backend, self.backend_reason = self._choose_backend(backend)
        log.info("%s: %s", name, self.backend_reason)
        self.backend.start(self)

    def _choose_backend(self, want: str) -> tuple[Any, str]:
        qd = self.profile.queue_depth
        if want in ("auto", "io_uring"):
            from iosched import uring_backend
            b, why = uring_backend.UringBackend.create(qd)
            if b is not None:
                return b, why
            if want == "io_uring":
                raise IOSchedError(f"io_uring backend asked for but unusable: {why}")
            return PreadvBackend(qd), f"preadv: {why}"
        return PreadvBackend(qd), f"preadv: asked for ({qd} worker threads)"

    # -- submitting ----------------------------------------------------------------------
    def submit_read(self, fd: int, offset: int, buffer: Any, *, priority: Priority,
                    deadline: float | None = None, merge: bool = True) -> IORequest:
        return self._submit("read", fd, offset, (buffer,), priority, deadline, merge)

    def submit_write(self, fd: int, offset: int, buffer: Any, *, priority: Priority,
                     deadline: float | None = None, merge: bool = True) -> IORequest:
        return self._submit("write", fd, offset, (buffer,), priority, deadline, merge)

    def submit_readv(self, fd: int, offset: int, buffers: Sequence[Any], *, priority: Priority,
                     deadline: float | None = None, merge: bool = True,
                     on_done: Callable[[IORequest], None] | None = None) -> IORequest:
        """One request over the contiguous file range starting at `offset` that fills
        `buffers` in order (scatter): one handle and one wait however many buffers. With
        merge=False no queued neighbour shares its transfers: a caller that acts on each
        completion (swapfs verifies each slot) gets them one by one, not together.
        on_done(request) runs in a backend thread once every byte has arrived, before the
        request is done (so waiters wake to its work: swapfs's checksums), after the backend
        has given the device its next transfers; if it raises, the request fails with that
        exception. It must not submit to or wait on this scheduler."""
        return self._submit("read", fd, offset, buffers, priority, deadline, merge, on_done)

    def submit_writev(self, fd: int, offset: int, buffers: Sequence[Any], *, priority: Priority,
                      deadline: float | None = None, merge: bool = True) -> IORequest:
        """Gather counterpart of submit_readv (without on_done)."""
        return self._submit("write", fd, offset, buffers, priority, deadline, merge)

    def _submit(self, op: str, fd: int, offset: int, buffers: Sequence[Any], priority: Priority,
                deadline: float | None, merge: bool,
                on_done: Callable[[IORequest], None] | None = None) -> IORequest:
        if offset < 0:
            raise ValueError(f"negative file offset {offset}")
        if not buffers:
            raise ValueError(f"{op} at offset {offset} names no buffer")
        views = [_flat_view(b, op, offset) for b in buffers]
        addrs = [address_of(v) for v in views]
        _check_direct_alignment(fd, offset, views, addrs)
        req = IORequest(op, fd, offset, views, priority, deadline, time.monotonic(), merge,
                        on_done)
        step = self.profile.request_bytes
        with self._lock:
            if self._closing:
                raise IOSchedError(f"I/O scheduler {self.name!r} is closed; submit before close()")
            pieces = []
            for part, part_addrs in _pack(views, addrs, step, _MAX_IOV):
                pieces.append(Piece(req, offset, part, part_addrs, self._seq))
                offset += pieces[-1].length
                self._seq += 1
            req._pieces = list(pieces)
            req._pieces_left = len(pieces)
            self._splits += len(pieces) - 1
            self._bytes_by_prio[req.priority.name] += req.length
            self._reqs_by_prio[req.priority.name] += 1
            self._outstanding += len(pieces)
            for p in pieces:
                self._queue.push(p)
            self._cond.notify_all()
            self.backend.wake()
        return req

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Submissions made inside are queued together: the backend takes none of them until
        the block exits, so consecutive ranges merge however fast the backend is. Keep the
        block short (it holds the scheduler's lock; other threads' submits wait for it)."""
        with self._lock:
            yield

    # -- waiting ---------------------------------------------------------------------------
    def wait(self, request: IORequest, *, promote: bool = True,
             timeout: float | None = None) -> int:
        t0 = time.monotonic()
        try:
            if not request.done():
                if promote:
                    with self._lock:
                        if self._queue.promote(request, Priority.WEIGHT_READ):
                            self._cond.notify_all()
                if not request._event.wait(timeout):
                    raise TimeoutError(f"{request!r} not done after {timeout} s; the device is"
                                       f" slow or the queue is long (statistics() tells which)")
        finally:
            with self._lock:
                self._wait_seconds += time.monotonic() - t0
        if request.error is not None:
            raise request.error
        assert request.result is not None
        return request.result

    def read(self, fd: int, offset: int, buffer: Any, *,
             priority: Priority = Priority.WEIGHT_READ) -> int:
        return self.wait(self.submit_read(fd, offset, buffer, priority=priority))

    def write(self, fd: int, offset: int, buffer: Any, *,
              priority: Priority = Priority.KV_WRITE_BACK) -> int:
        return self.wait(self.submit_write(fd, offset, buffer, priority=priority))

    def drain(self) -> None:
        with self._lock:
            while self._outstanding:
                self._cond.wait()

    # -- the backend's side ----------------------------------------------------------------
    def _take(self, *, block: bool) -> Transfer | None:
        """The next transfer in priority order, now counted in flight; None when nothing is
        queued and (not block, or the scheduler is closing)."""
        with self._lock:
            while True:
                if not self._paused or self._closing:
                    t = self._queue.pop_transfer(self.profile.request_bytes, _MAX_IOV)
                    if t is not None:
                        break
                if not block or (self._closing and not len(self._queue)):
                    return None
                self._cond.wait()
            self._merges += len(t.pieces) - 1
            op = t.op
            if self._in_flight[op] == 0:
                self._busy_since[op] = time.monotonic()
            self._in_flight[op] += 1
            self._max_in_flight = max(self._max_in_flight, sum(self._in_flight.values()))
            return t

    def _complete(self, t: Transfer, res: int | OSError, *, syscalls: int = 0) -> Transfer | None:
        """Account one syscall's result for `t`. Returns `t` when it must be resubmitted for
        its remaining bytes (a retry), else None (it finished or failed)."""
        with self._lock:
            self._syscalls += syscalls
            t.attempts += 1
            if isinstance(res, int) and res > 0:
                self._bytes[t.op] += res
                for p in t.advance(min(res, t.remaining)):
                    self._piece_done(p, None)
                if t.remaining == 0:
                    self._end_flight(t)
                    return None
            if t.attempts <= self.retries:
                self._retried += 1
                return t
            err = _error_for(t, res, self.retries)
            for p in t.unfinished():
                self._piece_done(p, err)
            self._end_flight(t)
            return None

    def _has_takeable(self) -> bool:
        """_take(block=False) would return a transfer now (caller holds the lock)."""
        return bool(len(self._queue)) and (not self._paused or self._closing)

    def _count_syscalls(self, n: int) -> None:
        with self._lock:
            self._syscalls += n

    def _end_flight(self, t: Transfer) -> None:
        op = t.op
        self._in_flight[op] -= 1
        assert self._in_flight[op] >= 0
        if self._in_flight[op] == 0:
            self._busy[op] += time.monotonic() - self._busy_since[op]
            self._busy_since[op] = None

    def _piece_done(self, p: Piece, err: Exception | None) -> None:
        req = p.request
        req._pieces_left -= 1
        assert req._pieces_left >= 0
        if err is not None and req.error is None:
            req.error = _bind(err, req)
        if req._pieces_left == 0 and req.error is None and req.on_done is not None:
            self._arrived.append(req)       # _run_hooks ends it (and counts its last piece)
            return
        if req._pieces_left == 0:
            self._end_request(req)
        self._outstanding -= 1
        if self._outstanding == 0:
            self._cond.notify_all()

    def _end_request(self, req: IORequest) -> None:
        if req.error is None:
            req.result = req.length
        else:
            self._errors += 1
        req.completion_index = self._completed
        self._completed += 1
        req._event.set()

    def _run_hooks(self) -> None:
        """Run the on_done of the requests that have arrived, then end them. Backends call it
        without the lock, from their own threads, before they block."""
        with self._lock:
            if not self._arrived:
                return
            reqs, self._arrived = self._arrived, []
        for req in reqs:
            try:
                req.on_done(req)
            except Exception as exc:           # the waiter gets it from wait()
                req.error = exc
        with self._lock:
            for req in reqs:
                self._end_request(req)
            self._outstanding -= len(reqs)
            if self._outstanding == 0:
                self._cond.notify_all()

    def _hooks_waiting(self) -> bool:
        """Some arrived request waits for _run_hooks (read without the lock by the one
        backend thread that appends to it)."""
        return bool(self._arrived)

    def _pause(self, paused: bool) -> None:
        """Test seam: while paused the backend takes nothing, so a test can queue a known
        set of requests before any is served."""
        with self._lock:
            self._paused = paused
            self._cond.notify_all()
            self.backend.wake()

    # -- reporting and shutdown ------------------------------------------------------------
    def statistics(self) -> IOStats:
        with self._lock:
            now = time.monotonic()
            busy = {op: self._busy[op] + (now - self._busy_since[op]
                                          if self._busy_since[op] is not None else 0.0)
                    for op in _OPS}
            bw = {op: self._bytes[op] / busy[op] if busy[op] > 0 and self._bytes[op] else 0.0
                  for op in _OPS}
            return IOStats(
                backend=self.backend.name, backend_reason=self.backend_reason,
                queue_depth=self.profile.queue_depth, request_bytes=self.profile.request_bytes,
                bytes_by_priority=dict(self._bytes_by_prio),
                requests_by_priority=dict(self._reqs_by_prio),
                read_bytes=self._bytes["read"], write_bytes=self._bytes["write"],
                read_seconds=busy["read"], write_seconds=busy["write"],
                read_bandwidth=bw["read"], write_bandwidth=bw["write"],
                max_in_flight=self._max_in_flight, merges=self._merges, splits=self._splits,
                retries=self._retried, errors=self._errors, wait_seconds=self._wait_seconds,
                syscalls=self._syscalls, thread_priority=self.thread_priority)

    def close(self) -> None:
        with self._lock:
            if self._closing:
                return
            self._paused = False
            self._cond.notify_all()
        self.drain()
        with self._lock:
            self._closing = True
            self._cond.notify_all()
        self.backend.stop()
        self._closed = True

    def __enter__(self) -> IOScheduler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _flat_view(buffer: Any, op: str, offset: int) -> memoryview:
    if type(buffer) is memoryview and buffer.format == "B" and buffer.ndim == 1 and \
            buffer.c_contiguous:
        view = buffer                  # the common case: a byte view, taken as it is
    else:
        view = memoryview(buffer)
        if view.ndim != 1 or view.format not in ("B", "b", "c"):
            view = view.cast("B")
        if not view.c_contiguous:
            raise ValueError("I/O buffer must be C-contiguous")
    if op == "read" and view.readonly:
        raise ValueError("read into a read-only buffer; pass a writable one (bytearray,"
                         " AlignedBuffer.view, a numpy array)")
    if len(view) == 0:
        raise ValueError(f"empty {op} at offset {offset}; lengths must be positive")
    return view


def _pack(views: Sequence[memoryview], addrs: Sequence[int], step: int,
          max_iov: int) -> list[tuple[tuple[memoryview, ...], tuple[int, ...]]]:
    """The views (at addresses addrs) cut into consecutive parts of at most `step` bytes and
    `max_iov` buffers each, with their addresses: a buffer is cut only where a part reaches
    `step` bytes."""
    lengths = [len(v) for v in views]
    if sum(lengths) <= step and len(views) <= max_iov:      # the common case: one part
        return [(tuple(views), tuple(addrs))]
    parts = []
    group: list[memoryview] = []
    at: list[int] = []
    size = 0
    for view, addr, length in zip(views, addrs, lengths):
        start = 0
        while start < length:
            take = min(length - start, step - size)
            group.append(view if take == length else view[start:start + take])
            at.append(addr + start)
            size += take
            start += take
            if size == step or len(group) == max_iov:
                parts.append((tuple(group), tuple(at)))
                group, at, size = [], [], 0
    if group:
        parts.append((tuple(group), tuple(at)))
    return parts


def _check_direct_alignment(fd: int, offset: int, views: Sequence[memoryview],
                            addrs: Sequence[int]) -> None:
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError:
        return   # a bad fd fails in the backend, as the request's error
    if not flags & getattr(os, "O_DIRECT", 0):
        return
    if not offset % ALIGN and not any(len(v) % ALIGN or a % ALIGN for v, a in zip(views, addrs)):
        return
    checks = [("file offset", offset)]
    for view, addr in zip(views, addrs):
        checks += [("length", len(view)), ("buffer address", addr)]
    what, value = next((w, x) for w, x in checks if x % ALIGN)
    raise ValueError(f"O_DIRECT fd {fd}: {what} {value:#x} is not a multiple of {ALIGN}; use"
                     f" iosched.AlignedBuffer and {ALIGN}-aligned ranges")


def _path_of(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"fd {fd}"


def _error_for(t: Transfer, res: int | OSError, retries: int) -> Exception:
    cls = IOReadError if t.op == "read" else IOWriteError
    where = (f"{t.op} of {t.remaining} bytes at offset {t.position} of {_path_of(t.fd)}"
             f" (fd {t.fd})")
    tries = f"after {t.attempts} attempts ({retries} retries)"
    if isinstance(res, OSError):
        return cls(f"{where} failed {tries}: {os.strerror(res.errno) if res.errno else res}"
                   f" (errno {res.errno})", errno=res.errno)
    what = "end of file" if t.op == "read" else "no space written"
    return cls(f"{where} came back short {tries}: {t.done_bytes} of {t.length} bytes"
               f" transferred, then 0 ({what}?)", errno=None)


def _bind(err: Exception, req: IORequest) -> Exception:
    """The error as this request's: a copy with .request set (one transfer may fail several
    merged requests)."""
    e = type(err)(str(err), request=req, errno=getattr(err, "errno", None))
    return e
