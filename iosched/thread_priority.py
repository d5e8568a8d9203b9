"""Raising the I/O threads' CPU priority above the compute threads'.

On a board with as many compute threads as cores, the threads that submit and complete I/O
wait for a time slice behind spinning compute threads, and the device idles: measured here
(2 cores, torch on 2 threads, weights streamed), renicing the I/O threads to -10 took a step
from 82 to 56 ms with the thread-pool backend. A thread lowers its own nice value when the
process may: root, CAP_SYS_NICE, or an RLIMIT_NICE that allows it (systemd: LimitNICE=-10).
Otherwise it keeps the default, and the reason is kept for statistics().
"""
from __future__ import annotations

import os
import threading

IO_NICE = -10


def raise_own_priority(nice: int = IO_NICE) -> str:
    """Set the calling thread's nice value; returns what happened, for the logs."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        return f"I/O threads at nice {nice}"
    except OSError as e:
        return (f"I/O threads at the default priority ({e.strerror} raising to nice {nice}: "
                f"needs CAP_SYS_NICE or LimitNICE={nice})")
