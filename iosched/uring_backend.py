"""UringBackend (io_uring) -- placeholder until the native ring is built."""
from __future__ import annotations


class UringBackend:
    name = "io_uring"

    @classmethod
    def create(cls, queue_depth: int):
        return None, "io_uring backend not implemented yet"
