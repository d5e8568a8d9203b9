import os
import time

import pytest

from iosched import IOScheduler


@pytest.mark.parametrize("backend", ["preadv", "io_uring"])
def test_io_threads_run_above_compute_when_allowed(backend):
    try:
        sched = IOScheduler(backend=backend)
    except Exception as e:          # noqa: BLE001 - io_uring may be unavailable: the reason
        pytest.skip(f"{backend}: {e}")
    try:
        for _ in range(100):
            if sched.statistics().thread_priority:
                break
            time.sleep(0.01)
        said = sched.statistics().thread_priority
        if os.geteuid() == 0:
            assert said == "I/O threads at nice -10"
            nice = [os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir("/proc/self/task")]
            assert nice.count(-10) >= 1 and os.getpriority(os.PRIO_PROCESS, 0) == 0   # not the caller
        else:
            assert "LimitNICE" in said or said.endswith("nice -10")
    finally:
        sched.close()
