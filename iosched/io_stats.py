"""IOStats: the frozen snapshot `IOScheduler.statistics()` returns."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class IOStats:
    """Counters since the scheduler started.

    backend / backend_reason: "io_uring" or "preadv", and why it was chosen.
    queue_depth / request_bytes: the profile in use (transfers in flight; merge/split size).
    bytes_by_priority / requests_by_priority: submitted, keyed by Priority name, at the
      priority of submission.
    read_bytes / write_bytes: bytes actually transferred.
    read_seconds / write_seconds: device-busy time, wall time with >= 1 transfer of that op
      in flight; read_bandwidth / write_bandwidth: bytes / busy seconds (0.0 before any).
    max_in_flight: most transfers in flight at once; merges: pieces that joined another's
      syscall; splits: extra pieces made by cutting requests at request_bytes; retries:
      resubmissions of failed or short transfers; errors: requests that failed.
    wait_seconds: time callers spent blocked in wait().
    syscalls: system calls the backend made for I/O (preadv/pwritev calls, or io_uring_enter
      calls for submission and for waiting).
    thread_priority: the I/O threads' CPU priority, or why it stayed the default.
    """
    backend: str
    backend_reason: str
    queue_depth: int
    request_bytes: int
    bytes_by_priority: dict[str, int]
    requests_by_priority: dict[str, int]
    read_bytes: int
    write_bytes: int
    read_seconds: float
    write_seconds: float
    read_bandwidth: float
    write_bandwidth: float
    max_in_flight: int
    merges: int
    splits: int
    retries: int
    errors: int
    wait_seconds: float
    syscalls: int
    thread_priority: str = ""

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)
