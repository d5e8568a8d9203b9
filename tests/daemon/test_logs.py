"""journald-friendly log lines."""
import logging
import os
import sys

from kvmm_daemon.daemon.logs import JournalFormatter, stderr_is_journal


def record(level, msg, exc=False):
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            exc_info = sys.exc_info()
    return logging.LogRecord("kvmm.server", level, __file__, 1, msg, (), exc_info)


def test_journal_lines_carry_the_priority_and_stay_one_line():
    f = JournalFormatter(journal=True)
    assert f.format(record(logging.INFO, "serving")) == "<6>kvmm.server: serving"
    assert f.format(record(logging.WARNING, "slow")).startswith("<4>")
    line = f.format(record(logging.ERROR, "failed\nbadly", exc=True))
    assert line.startswith("<3>kvmm.server: failed\\nbadly") and "\n" not in line and "ValueError" in line


def test_terminal_lines_have_time_and_level():
    line = JournalFormatter(journal=False).format(record(logging.INFO, "hello"))
    assert "INFO" in line and line.endswith("kvmm.server: hello") and not line.startswith("<")


def test_journal_detection_compares_device_and_inode():
    st = os.fstat(sys.stderr.fileno())
    assert stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    assert not stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
    assert not stderr_is_journal({})
