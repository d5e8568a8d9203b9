"""Plain O_DIRECT read bandwidth of a file: the flash limit that weight streaming is held to.

The strongest simple reader: huge-page buffers (iosched.AlignedBuffer), `depth` requests of
`chunk` bytes in flight from as many threads (os.preadv releases the GIL), over the file in
order, page cache bypassed; best of `repeats` passes.
"""
from __future__ import annotations

import os
import threading
import time

from iosched.aligned_buffer import ALIGN, AlignedBuffer


def direct_read_bandwidth(path: str, *, chunk: int = 1 << 20, depth: int = 4, total: int | None = None,
                          repeats: int = 3) -> float:
    """Bytes/s reading `total` bytes (default: the whole file) in `chunk`-byte O_DIRECT reads."""
    chunk = -(-chunk // ALIGN) * ALIGN
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size // chunk * chunk
        total = min(total or size, size)
        offsets = list(range(0, total, chunk))
        bufs = [AlignedBuffer(chunk) for _ in range(depth)]
        best = 0.0
        for _ in range(repeats):
            lock, nxt = threading.Lock(), iter(offsets)

            def worker(buf: AlignedBuffer) -> None:
                view = buf.view[:chunk]
                while True:
                    with lock:
                        off = next(nxt, None)
                    if off is None:
                        return
                    os.preadv(fd, [view], off)

            threads = [threading.Thread(target=worker, args=(b,)) for b in bufs]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            best = max(best, total / (time.perf_counter() - t0))
        for b in bufs:
            b.close()
        return best
    finally:
        os.close(fd)
