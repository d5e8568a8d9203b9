"""UringBackend: one dispatcher thread that keeps up to `queue_depth` transfers in flight on
an io_uring (the C binding in csrc/uring.c, called through ctypes, which drops the GIL).

The loop: take transfers from the scheduler until the ring holds queue_depth (blocking only
when nothing is in flight), queue one READV/WRITEV SQE for each and submit it with its own
io_uring_enter; then run the on_done hooks of the requests that arrived (swapfs verifies a
read's slots: this overlaps the transfers just submitted), wait for at least one completion
and reap every completion that is there. A short or failed completion the scheduler wants
retried is submitted again at once. One io_uring_enter per transfer, not one per batch: the
kernel plugs the bios of one io_uring_enter together and merges adjacent ones, and this VM's
virtio disk serves the merged requests (up to max_sectors_kb, 4 MiB) slower than the 1 MiB
ones they were made of: 256 MiB of adjacent 1 MiB reads went as 126 device requests at
2.1 GB/s submitted together, as 258 at 2.3-2.4 GB/s with gaps between them, as preadv
threads (no shared plug) get.

New work that arrives while transfers are in flight and the ring has room wakes the
dispatcher at once: an eventfd registered on the ring (liburing's io_uring_register_eventfd)
signals completions, a second eventfd signals new work, and the dispatcher polls both
instead of blocking in the ring. (Without that, a batch submitted piece by piece — swapfs
hashes a run of slots, submits it, hashes the next — ran with one transfer in flight until
the first completion.) Where the registration is refused the dispatcher blocks in the ring
as before and takes such work at the next completion.

Prior art: liburing's io_uring-cp example, RocksDB's io_uring MultiRead, fio's ioengine,
the eventfd-driven rings of libuv and SPDK. Left out: SQPOLL, fixed buffers.
"""
from __future__ import annotations

import ctypes
import os
import select
import threading
from typing import TYPE_CHECKING

from iosched import uring_native
from iosched.thread_priority import raise_own_priority

if TYPE_CHECKING:
    from iosched.scheduler import IOScheduler
    from iosched.transfer import Transfer


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class UringBackend:
    """Attributes: name ("io_uring"); queue_depth: transfers in flight at most; entries: the
    ring's SQ size (>= queue_depth); _ring: the native ring (None after stop());
    _thread: the dispatcher. The dispatcher alone touches the ring after start().
    _cq_fd: eventfd the ring signals on every completion, _wake_fd: eventfd submitters
      signal; both -1 when the registration was refused (then the dispatcher blocks in the
      ring). _sleeping: the dispatcher is in (or about to enter) poll() with transfers in
      flight; set and cleared under the scheduler's lock, where wake() reads it."""

    name = "io_uring"

    def __init__(self, lib: ctypes.CDLL, ring: int, queue_depth: int, entries: int) -> None:
        self._lib = lib
        self._ring: int | None = ring
        self.queue_depth = queue_depth
        self.entries = entries
        self._thread: threading.Thread | None = None
        self._sleeping = False
        self._cq_fd = self._wake_fd = -1
        try:
            uring = ctypes.CDLL("liburing.so.2")
            cq_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            if uring.io_uring_register_eventfd(ctypes.c_void_p(ring), cq_fd) == 0:
                # (the binding's struct kvr starts with its struct io_uring)
                self._cq_fd = cq_fd
                self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            else:
                os.close(cq_fd)
        except (OSError, AttributeError):
            pass

    @classmethod
    def create(cls, queue_depth: int) -> tuple[UringBackend | None, str]:
        """(backend, "io_uring: ...") or (None, why io_uring cannot be used)."""
        lib, why = uring_native.load()
        if lib is None:
            return None, why
        entries = 1 << max(queue_depth - 1, 0).bit_length()
        err = ctypes.c_int(0)
        ring = lib.kvr_open(entries, ctypes.byref(err))
        if not ring:
            hint = (" (io_uring disabled: sysctl kernel.io_uring_disabled, or a seccomp filter)"
                    if err.value in (1, 38) else "")
            return None, (f"io_uring ring of {entries} entries refused:"
                          f" {os.strerror(err.value)}{hint}")
        return cls(lib, ring, queue_depth, entries), (
            f"io_uring: native ring of {entries} entries, {queue_depth} in flight"
            f" ({uring_native.library_path()})")

    def start(self, sched: IOScheduler) -> None:
        self._thread = threading.Thread(target=self._run, args=(sched,), daemon=True,
                                        name=f"{sched.name}-uring")
        self._thread.start()

    def _prep(self, t: Transfer, ud: int) -> None:
        spans = t.spans()
        iov = (_Iovec * len(spans))(*spans)
        t.iov_keepalive = iov
        t.user_data = ud
        rc = self._lib.kvr_prep(self._ring, 0 if t.op == "read" else 1, t.fd,
                                ctypes.addressof(iov), len(spans), t.position, ud)
        assert rc == 0, f"io_uring SQ full although {self.entries} >= queue depth"

    def _run(self, sched: IOScheduler) -> None:
        sched.thread_priority = raise_own_priority()
        lib, ring = self._lib, self._ring
        qd = self.queue_depth
        in_flight: dict[int, Transfer] = {}
        next_ud = 1
        ud_arr = (ctypes.c_ulonglong * qd)()
        res_arr = (ctypes.c_int * qd)()
        entered = ctypes.c_int(0)
        while True:
            idle = False
            while len(in_flight) < qd:
                idle = not in_flight and not sched._hooks_waiting()
                t = sched._take(block=idle)
                if t is None:
                    break
                self._prep(t, next_ud)
                in_flight[next_ud] = t
                next_ud += 1
                if not self._submit(sched, in_flight):
                    break
            if idle and not in_flight:
                return                           # closing and nothing left
            sched._run_hooks()                   # while the device works on what just went
            if not in_flight:
                continue
            if self._wake_fd >= 0 and len(in_flight) < qd:
                n = self._reap_or_wake(sched, ud_arr, res_arr, entered)
            else:
                n = lib.kvr_reap(ring, 1, ud_arr, res_arr, qd, ctypes.byref(entered))
                sched._count_syscalls(entered.value)
            if n < 0:
                raise OSError(-n, f"io_uring wait failed: {os.strerror(-n)}")
            for i in range(n):
                t = in_flight.pop(ud_arr[i])
                res = res_arr[i]
                again = sched._complete(t, res if res >= 0 else OSError(-res, os.strerror(-res)))
                if again is not None:
                    self._prep(again, next_ud)
                    in_flight[next_ud] = again
                    next_ud += 1
                    if not self._submit(sched, in_flight):
                        break

    def _submit(self, sched: IOScheduler, in_flight: dict[int, Transfer]) -> bool:
        """One io_uring_enter for the SQE just queued. False when the ring itself failed:
        then every transfer in flight has failed with that error and in_flight is empty."""
        rc = self._lib.kvr_submit(self._ring)
        sched._count_syscalls(1)
        if rc >= 0:
            return True
        err = OSError(-rc, os.strerror(-rc))
        for ud, t in list(in_flight.items()):
            del in_flight[ud]
            self._finish(sched, t, err, in_flight)
        return False

    def _reap_or_wake(self, sched: IOScheduler, ud_arr, res_arr, entered) -> int:
        """Completions that are there; if none and no new work is queued, sleep until a
        completion or new work (wake()) arrives. May return 0 (new work only)."""
        _drain(self._cq_fd)
        n = self._lib.kvr_reap(self._ring, 0, ud_arr, res_arr, self.queue_depth,
                               ctypes.byref(entered))
        if n != 0:
            return n
        with sched._lock:
            self._sleeping = not sched._has_takeable()
        if self._sleeping:
            poller = select.poll()
            poller.register(self._cq_fd, select.POLLIN)
            poller.register(self._wake_fd, select.POLLIN)
            poller.poll()
            sched._count_syscalls(1)
            with sched._lock:
                self._sleeping = False
            _drain(self._wake_fd)
        return self._lib.kvr_reap(self._ring, 0, ud_arr, res_arr, self.queue_depth,
                                  ctypes.byref(entered))

    def wake(self) -> None:
        """New work was queued (called under the scheduler's lock)."""
        if self._sleeping:
            self._sleeping = False
            os.eventfd_write(self._wake_fd, 1)

    def _finish(self, sched: IOScheduler, t: Transfer, err: OSError,
                in_flight: dict[int, Transfer]) -> None:
        while t is not None:
            t = sched._complete(t, err)

    def stop(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._ring is not None:
            self._lib.kvr_close(self._ring)
            self._ring = None
        for fd in (self._cq_fd, self._wake_fd):
            if fd >= 0:
                os.close(fd)
        self._cq_fd = self._wake_fd = -1


def _drain(fd: int) -> None:
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass
