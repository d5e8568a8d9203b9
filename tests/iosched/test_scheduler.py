import os
import subprocess
import sys
import time

import pytest

from iosched import IOReadError, IOSchedError, IOStats, IOWriteError, Priority
from iosched.aligned_buffer import ALIGN

from .conftest import BACKENDS, FILE_BYTES, make

KiB = 1024
MiB = 1 << 20

pytestmark = pytest.mark.parametrize("backend", BACKENDS)


def _wait_until(cond, what, timeout=10.0):
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


def _queue_low(s, fd, buf, n=16):
    """n KV_WRITE_BACK reads of 64 KiB at 128 KiB strides (non-adjacent: nothing merges)."""
    return [s.submit_read(fd, i * 128 * KiB, buf.view[i * 128 * KiB:i * 128 * KiB + 64 * KiB],
                          priority=Priority.KV_WRITE_BACK) for i in range(n)]


def test_read_write_round_trip(backend, data, buf):
    path, content, fd = data
    with make(backend) as s:
        assert s.read(fd, 0, buf.view[:3 * MiB]) == 3 * MiB
        assert bytes(buf.view[:3 * MiB]) == content[:3 * MiB]
        buf.view[:64 * KiB] = b"\xab" * (64 * KiB)
        assert s.write(fd, 4 * MiB, buf.view[:64 * KiB]) == 64 * KiB
        st = s.statistics()
        assert st.backend == backend
        assert st.read_bytes == 3 * MiB and st.write_bytes == 64 * KiB
    with open(path, "rb") as f:
        f.seek(4 * MiB)
        assert f.read(64 * KiB) == b"\xab" * (64 * KiB)


def test_adjacent_requests_merge_into_one_syscall(backend, data, buf):
    _, content, fd = data
    with make(backend, qd=1) as s:
        s._pause(True)
        a = s.submit_read(fd, 0, buf.view[:256 * KiB], priority=Priority.KV_SWAP_IN)
        b = s.submit_read(fd, 256 * KiB, buf.view[256 * KiB:512 * KiB], priority=Priority.KV_SWAP_IN)
        before = s.statistics().syscalls
        s._pause(False)
        assert s.wait(a) == 256 * KiB and s.wait(b) == 256 * KiB
        st = s.statistics()
        assert bytes(buf.view[:512 * KiB]) == content[:512 * KiB]
        assert st.merges == 1
        # preadv: one preadv; io_uring: one submit + one wait
        assert st.syscalls - before == 1 if backend == "preadv" else st.syscalls - before in (1, 2)


def test_merge_stops_at_request_bytes(backend, data, buf):
    _, content, fd = data
    with make(backend, qd=1, request_bytes=512 * KiB) as s:
        s._pause(True)
        reqs = [s.submit_read(fd, i * 256 * KiB, buf.view[i * 256 * KiB:(i + 1) * 256 * KiB],
                              priority=Priority.KV_SWAP_IN) for i in range(4)]
        s._pause(False)
        for r in reqs:
            s.wait(r)
        assert s.statistics().merges == 2       # two transfers of two pieces each
        assert bytes(buf.view[:MiB]) == content[:MiB]


def test_requests_without_merge_go_alone(backend, data, buf):
    _, content, fd = data
    with make(backend, qd=1) as s:
        s._pause(True)
        half = [s.submit_read(fd, i * 128 * KiB, buf.view[i * 128 * KiB:(i + 1) * 128 * KiB],
                              priority=Priority.KV_SWAP_IN, merge=i % 2 == 0) for i in range(4)]
        s._pause(False)
        for r in half:
            s.wait(r)
        assert s.statistics().merges == 0       # every neighbour of a mergeable one is not
        assert bytes(buf.view[:512 * KiB]) == content[:512 * KiB]
        s._pause(True)
        apart = s.submit_readv(fd, 0, [buf.view[:64 * KiB], buf.view[64 * KiB:256 * KiB]],
                               priority=Priority.KV_SWAP_IN, merge=False)
        along = s.submit_read(fd, 256 * KiB, buf.view[256 * KiB:512 * KiB],
                              priority=Priority.KV_SWAP_IN)
        s._pause(False)
        s.wait(apart), s.wait(along)
        assert s.statistics().merges == 0 and apart.completion_index != along.completion_index
        assert bytes(buf.view[:512 * KiB]) == content[:512 * KiB]


def test_big_request_is_split(backend, data, buf):
    _, content, fd = data
    with make(backend, qd=4, request_bytes=512 * KiB) as s:
        assert s.read(fd, 0, buf.view[:4 * MiB]) == 4 * MiB
        st = s.statistics()
        assert st.splits == 7
        assert bytes(buf.view[:4 * MiB]) == content[:4 * MiB]


def test_strict_priority_order(backend, data, buf):
    _, _, fd = data
    with make(backend, qd=1) as s:
        s._pause(True)
        low = _queue_low(s, fd, buf)
        mid = s.submit_read(fd, 7 * MiB, buf.view[7 * MiB:7 * MiB + 64 * KiB],
                            priority=Priority.WEIGHT_PREFETCH)
        high = s.submit_read(fd, 6 * MiB, buf.view[6 * MiB:6 * MiB + 64 * KiB],
                             priority=Priority.WEIGHT_READ)
        s._pause(False)
        for r in low + [mid, high]:
            s.wait(r, promote=False)
        assert high.completion_index == 0 and mid.completion_index == 1
        assert [r.completion_index for r in low] == list(range(2, 18))   # FIFO within a class


def test_deadline_orders_within_a_class(backend, data, buf):
    _, _, fd = data
    with make(backend, qd=1) as s:
        s._pause(True)
        now = time.monotonic()
        late = s.submit_read(fd, 0, buf.view[:4 * KiB], priority=Priority.KV_SWAP_IN,
                             deadline=now + 10)
        none = s.submit_read(fd, 1 * MiB, buf.view[MiB:MiB + 4 * KiB], priority=Priority.KV_SWAP_IN)
        soon = s.submit_read(fd, 2 * MiB, buf.view[2 * MiB:2 * MiB + 4 * KiB],
                             priority=Priority.KV_SWAP_IN, deadline=now + 1)
        s._pause(False)
        for r in (late, none, soon):
            s.wait(r, promote=False)
        assert [soon.completion_index, late.completion_index, none.completion_index] == [0, 1, 2]


def test_wait_promotes_a_queued_request(backend, data, buf):
    _, _, fd = data
    with make(backend, qd=1) as s:
        s._pause(True)
        low = _queue_low(s, fd, buf)
        target = s.submit_read(fd, 6 * MiB, buf.view[6 * MiB:6 * MiB + 64 * KiB],
                               priority=Priority.KV_WRITE_BACK)
        import threading
        waiter = threading.Thread(target=s.wait, args=(target,))
        waiter.start()
        _wait_until(lambda: target.priority == Priority.WEIGHT_READ, "the promotion")
        s._pause(False)
        waiter.join()
        for r in low:
            s.wait(r)
        assert target.completion_index == 0
        assert s.statistics().wait_seconds > 0


def test_short_read_at_eof_fails_after_retries(backend, data, buf):
    path, content, fd = data
    with make(backend, retries=2) as s:
        r = s.submit_read(fd, FILE_BYTES - 4 * KiB, buf.view[:16 * KiB], priority=Priority.KV_SWAP_IN)
        with pytest.raises(IOReadError) as ei:
            s.wait(r)
        e = ei.value
        assert e.request is r and e.errno is None
        assert path in str(e) and str(FILE_BYTES) in str(e) and "short" in str(e)
        assert "3 attempts" in str(e)
        st = s.statistics()
        assert st.retries == 2 and st.errors == 1
        # the bytes that did arrive are there
        assert bytes(buf.view[:4 * KiB]) == content[-4 * KiB:]


def test_bad_fd_fails_and_scheduler_keeps_serving(backend, data, buf, data_dir):
    _, content, fd = data
    with make(backend, retries=1) as s:
        # closed after the scheduler exists, so its own fds (the ring's) cannot take the number
        bad = os.open(os.path.join(data_dir, "gone"), os.O_RDWR | os.O_CREAT)
        os.close(bad)
        r = s.submit_read(bad, 0, buf.view[:4 * KiB], priority=Priority.WEIGHT_READ)
        with pytest.raises(IOReadError) as ei:
            s.wait(r)
        assert ei.value.errno == 9 and "errno 9" in str(ei.value)   # EBADF
        w = s.submit_write(bad, 0, buf.view[:4 * KiB], priority=Priority.KV_WRITE_BACK)
        with pytest.raises(IOWriteError):
            s.wait(w)
        assert s.read(fd, MiB, buf.view[:64 * KiB]) == 64 * KiB
        assert bytes(buf.view[:64 * KiB]) == content[MiB:MiB + 64 * KiB]
        assert s.statistics().errors == 2


def test_misaligned_direct_io_is_refused(backend, data, buf):
    _, _, fd = data
    with make(backend) as s:
        with pytest.raises(ValueError, match="file offset 0x200"):
            s.submit_read(fd, 512, buf.view[:4 * KiB], priority=Priority.WEIGHT_READ)
        with pytest.raises(ValueError, match="length"):
            s.submit_read(fd, 0, buf.view[:1000], priority=Priority.WEIGHT_READ)
        with pytest.raises(ValueError, match="buffer address"):
            s.submit_read(fd, 0, buf.view[1:ALIGN + 1], priority=Priority.WEIGHT_READ)
        with pytest.raises(ValueError, match="read-only"):
            s.submit_read(fd, 0, bytes(4096), priority=Priority.WEIGHT_READ)


def test_buffered_fd_takes_any_alignment(backend, data, buf):
    path, content, _ = data
    fd = os.open(path, os.O_RDONLY)
    try:
        with make(backend) as s:
            out = bytearray(1000)
            assert s.read(fd, 513, out) == 1000
            assert bytes(out) == content[513:1513]
    finally:
        os.close(fd)


def test_statistics_fields(backend, data, buf):
    _, _, fd = data
    with make(backend, qd=2, request_bytes=MiB) as s:
        s.read(fd, 0, buf.view[:2 * MiB], priority=Priority.KV_SWAP_IN)
        s.write(fd, 2 * MiB, buf.view[:MiB])
        st = s.statistics()
        assert isinstance(st, IOStats)
        d = st.as_dict()
        assert set(d) == {f.name for f in IOStats.__dataclass_fields__.values()}
        assert st.queue_depth == 2 and st.request_bytes == MiB
        assert set(st.bytes_by_priority) == {p.name for p in Priority}
        assert st.bytes_by_priority["KV_SWAP_IN"] == 2 * MiB
        assert st.bytes_by_priority["KV_WRITE_BACK"] == MiB
        assert st.requests_by_priority["KV_SWAP_IN"] == 1
        assert st.read_bytes == 2 * MiB and st.write_bytes == MiB
        assert st.read_seconds > 0 and st.write_seconds > 0
        assert st.read_bandwidth > 0 and st.write_bandwidth > 0
        assert 1 <= st.max_in_flight <= 2
        assert st.splits == 1 and st.errors == 0 and st.syscalls >= 3
        assert st.backend_reason.startswith(backend)
        with pytest.raises(Exception):
            st.read_bytes = 0   # frozen


def test_close_is_idempotent_and_refuses_new_work(backend, data, buf):
    _, _, fd = data
    s = make(backend)
    r = s.submit_read(fd, 0, buf.view[:MiB], priority=Priority.WEIGHT_PREFETCH)
    s.close()
    assert r.done() and r.result == MiB     # close drains
    s.close()
    with pytest.raises(IOSchedError, match="closed"):
        s.submit_read(fd, 0, buf.view[:MiB], priority=Priority.WEIGHT_READ)


def test_drain_waits_for_everything(backend, data, buf):
    _, _, fd = data
    with make(backend, qd=2, request_bytes=256 * KiB) as s:
        reqs = [s.submit_read(fd, i * MiB, buf.view[i * MiB:(i + 1) * MiB],
                              priority=Priority.WEIGHT_PREFETCH) for i in range(4)]
        s.drain()
        assert all(r.done() and r.result == MiB for r in reqs)


def test_vectored_request_scatters_and_gathers_in_order(backend, data, buf):
    """submit_readv/submit_writev: one request (one handle, one wait) over several buffers,
    in file order, packed into pieces of at most the request size and merged like any
    other."""
    _, content, fd = data
    with make(backend, request_bytes=128 * KiB) as s:
        views = [buf.view[0:4 * KiB], buf.view[1 * MiB:1 * MiB + 300 * KiB],
                 buf.view[2 * MiB:2 * MiB + 8 * KiB]]
        req = s.submit_readv(fd, 64 * KiB, views, priority=Priority.KV_SWAP_IN)
        assert req.buffer is None and len(req.buffers) == 3 and req.length == 312 * KiB
        assert s.wait(req) == 312 * KiB
        assert s.statistics().splits == 2        # packed across buffers: 128 + 128 + 56 KiB
        got = b"".join(bytes(v) for v in views)
        assert got == content[64 * KiB:64 * KiB + 312 * KiB]
        for v, byte in zip(views, (b"\x01", b"\x02", b"\x03")):
            v[:] = byte * len(v)
        assert s.wait(s.submit_writev(fd, 4 * MiB, views, priority=Priority.KV_WRITE_BACK)) \
            == 312 * KiB
        check = buf.view[6 * MiB:6 * MiB + 312 * KiB]
        assert s.read(fd, 4 * MiB, check) == 312 * KiB
        assert bytes(check) == b"\x01" * (4 * KiB) + b"\x02" * (300 * KiB) + b"\x03" * (8 * KiB)
        with pytest.raises(ValueError, match="length"):
            s.submit_readv(fd, 0, [buf.view[:4 * KiB], buf.view[8 * KiB:8 * KiB + 100]],
                           priority=Priority.KV_SWAP_IN)


def test_new_work_is_served_while_a_transfer_is_in_flight(backend, data, buf):
    """A read that cannot finish (an empty pipe) is in flight; a file read submitted after it
    still completes at once (the io_uring dispatcher is woken for new work, not only by
    completions)."""
    if backend == "preadv":
        pytest.skip("preadv cannot read a pipe at an offset (ESPIPE); its workers wait on the"
                    " scheduler's condition and need no wake-up")
    _, content, fd = data
    r, w = os.pipe()
    try:
        with make(backend, qd=4) as s:
            stuck = s.submit_read(r, 0, bytearray(4 * KiB), priority=Priority.KV_SWAP_IN)
            _wait_until(lambda: s.statistics().max_in_flight >= 1, "the pipe read in flight")
            req = s.submit_read(fd, 0, buf.view[:64 * KiB], priority=Priority.KV_SWAP_IN)
            assert s.wait(req, timeout=5) == 64 * KiB and not stuck.done()
            assert bytes(buf.view[:64 * KiB]) == content[:64 * KiB]
            os.write(w, b"x" * (4 * KiB))
            assert s.wait(stuck, timeout=5) == 4 * KiB
    finally:
        os.close(r)
        os.close(w)


def test_on_done_runs_in_a_backend_thread_before_the_request_is_done(backend, data, buf):
    """on_done sees the bytes that arrived, in a backend's thread, and the waiter wakes
    after it returned; one that raises fails its request with that exception, and the
    scheduler goes on."""
    import threading
    _, content, fd = data
    seen = []

    def check(req):
        seen.append((threading.current_thread().name, bytes(req.buffers[1][:16]), req.done()))

    with make(backend, qd=2, request_bytes=256 * KiB) as s:
        views = [buf.view[:4 * KiB], buf.view[MiB:MiB + 600 * KiB]]        # split in 3
        req = s.submit_readv(fd, 0, views, priority=Priority.KV_SWAP_IN, on_done=check)
        assert s.wait(req) == 604 * KiB
        assert len(seen) == 1 and seen[0][0].startswith("test-")
        assert seen[0][1] == content[4 * KiB:4 * KiB + 16] and seen[0][2] is False

        def broken(req):
            raise RuntimeError("checksum mismatch")

        bad = s.submit_readv(fd, 0, [buf.view[:64 * KiB]], priority=Priority.KV_SWAP_IN,
                             on_done=broken)
        with pytest.raises(RuntimeError, match="checksum mismatch"):
            s.wait(bad)
        assert bad.done() and s.read(fd, 0, buf.view[:64 * KiB]) == 64 * KiB
        s.drain()
        assert s.statistics().errors == 1

