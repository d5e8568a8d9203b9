"""iosched: kvmm's I/O scheduler, a leaf package (imports numpy and the stdlib only; nothing
of kvmm_daemon, swapfs, kernels or torch).

  IOScheduler      submit reads/writes, wait for them; merging, splitting, strict priorities,
                   retries, statistics (iosched.scheduler)
  IORequest, Priority   a submitted transfer and its class (iosched.request)
  DeviceProfile    queue depth and request size measured once per device (iosched.device_profile)
  AlignedBuffer    huge-page, O_DIRECT-ready memory (iosched.aligned_buffer)
Module map: errors, request, request_queue (the pending pieces), transfer (one vectored
syscall), preadv_backend, uring_backend + uring_native (the C ring in csrc/uring.c),
scheduler, io_stats, device_profile, aligned_buffer.
"""
from iosched.aligned_buffer import AlignedBuffer
from iosched.device_profile import DeviceProfile
from iosched.errors import DeviceError, IOReadError, IOSchedError, IOWriteError
from iosched.io_stats import IOStats
from iosched.request import IORequest, Priority
from iosched.scheduler import IOScheduler

__all__ = ["AlignedBuffer", "DeviceError", "DeviceProfile", "IOReadError", "IORequest",
           "IOSchedError", "IOScheduler", "IOStats", "IOWriteError", "Priority"]
