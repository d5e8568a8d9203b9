import numpy as np
import pytest
import torch

from iosched.aligned_buffer import (ALIGN, HUGE_PAGE, AlignedBuffer, address_of, as_byte_view,
                                    is_direct_io_capable)


def _thp_mode() -> str:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return "unknown"
    return text.split("[")[1].split("]")[0]


def test_buffer_is_aligned_rounded_and_writable():
    with AlignedBuffer(3 * 1024 * 1024) as buf:
        assert buf.nbytes == 2 * HUGE_PAGE
        assert buf.address % HUGE_PAGE == 0
        assert address_of(buf.view) == buf.address
        buf.view[-1] = 7
        assert buf.view[-1] == 7
        assert is_direct_io_capable(buf.view[ALIGN:2 * ALIGN])
        assert not is_direct_io_capable(buf.view[1:ALIGN + 1])


@pytest.mark.skipif(_thp_mode() not in ("always", "madvise"),
                    reason=f"transparent huge pages are '{_thp_mode()}' on this kernel")
def test_buffer_gets_huge_pages():
    with AlignedBuffer(8 * HUGE_PAGE) as buf:
        assert buf.huge_pages_requested
        assert buf.huge_page_bytes() >= HUGE_PAGE  # under fragmentation some may be 4 KiB


def test_torch_wraps_the_buffer_without_copy_and_close_survives_views():
    buf = AlignedBuffer(HUGE_PAGE)
    t = torch.frombuffer(buf.view, dtype=torch.float32)
    t[0] = 1.5
    assert np.frombuffer(buf.view[:4], dtype=np.float32)[0] == 1.5
    buf.close()          # the tensor still holds the mapping
    t[1] = 2.0
    assert float(t[0]) == 1.5 and buf.view is None


def test_as_byte_view_accepts_block_shaped_inputs():
    kv = torch.zeros(4, 2, 2, 16, 2, 64)
    v = as_byte_view(kv[1], writable=True)
    assert len(v) == kv[1].numel() * 4
    v[0] = 255
    assert kv[1].view(torch.uint8).flatten()[0] == 255
    assert len(as_byte_view(b"abcd", writable=False)) == 4
    assert len(as_byte_view(np.zeros((3, 5), dtype=np.float16), writable=True)) == 30
    with pytest.raises(ValueError, match="read-only"):
        as_byte_view(b"abcd", writable=True)
    with pytest.raises(ValueError, match="contiguous"):
        as_byte_view(kv[:, 0], writable=False)


def test_lock_pins_or_says_which_limit_to_raise():
    import resource
    with AlignedBuffer(HUGE_PAGE) as buf:
        assert buf.lock() is True, buf.lock_error
        assert buf.locked and buf.lock_error is None
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    code = ("import resource, os; from iosched.aligned_buffer import AlignedBuffer, HUGE_PAGE;"
            "os.setgid(65534); os.setuid(65534) if os.geteuid() == 0 else None;"
            "resource.setrlimit(resource.RLIMIT_MEMLOCK, (4096, 4096));"
            "b = AlignedBuffer(HUGE_PAGE); ok = b.lock(); print(ok); print(b.lock_error)")
    import os
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert out.returncode == 0, out.stderr
    ok, msg = out.stdout.splitlines()
    assert ok == "False"
    assert "LimitMEMLOCK=" in msg and "ulimit -l" in msg
    assert "soft 4 KiB, hard 4 KiB" in msg      # the limit it ran into
