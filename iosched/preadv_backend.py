"""PreadvBackend: `queue_depth` worker threads, each taking the next transfer from the
scheduler and issuing one os.preadv/os.pwritev for it (the GIL is released in the syscall,
so the threads keep that many requests at the device), then running the on_done hooks of
the requests that arrived.

Prior art: the thread pools of glibc's POSIX AIO and of RocksDB's MultiRead fallback.
Left out: per-thread affinity (two cores here).
"""
from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING

from iosched.thread_priority import raise_own_priority

if TYPE_CHECKING:
    from iosched.scheduler import IOScheduler


class PreadvBackend:
    """Attributes: name ("preadv"); queue_depth: worker threads = transfers in flight at most;
    _threads: started by start(), joined by stop() (they exit when the scheduler's _take
    returns None, i.e. it is closing and nothing is queued)."""

    name = "preadv"

    def __init__(self, queue_depth: int) -> None:
        self.queue_depth = queue_depth
        self._threads: list[threading.Thread] = []

    def start(self, sched: IOScheduler) -> None:
        for i in range(self.queue_depth):
            t = threading.Thread(target=self._run, args=(sched,), daemon=True,
                                 name=f"{sched.name}-preadv-{i}")
            t.start()
            self._threads.append(t)

    def _run(self, sched: IOScheduler) -> None:
        sched.thread_priority = raise_own_priority()
        while True:
            t = sched._take(block=True)
            if t is None:
                return
            while t is not None:
                try:
                    if t.op == "read":
                        res: int | OSError = os.preadv(t.fd, t.iov(), t.position)
                    else:
                        res = os.pwritev(t.fd, t.iov(), t.position)
                except OSError as e:
                    res = e
                t = sched._complete(t, res, syscalls=1)
            sched._run_hooks()

    def wake(self) -> None:
        """New work was queued: the workers wait on the scheduler's condition already."""

    def stop(self) -> None:
        for t in self._threads:
            t.join()
        self._threads.clear()
