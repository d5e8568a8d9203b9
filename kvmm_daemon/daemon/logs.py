"""Logging to stderr in a form journald understands.

Under systemd (stderr is the journal stream named by $JOURNAL_STREAM) each line starts with
the syslog priority in angle brackets, `<6>message`, which journald turns into the PRIORITY
field and strips (sd-daemon(3)); the journal adds timestamps and the unit name itself. On a
terminal each line gets a timestamp and level instead. One record is one line: newlines in a
message are escaped so a record cannot be mistaken for several, and in the journal an
exception is summed up on that line (type, message, innermost frame) instead of a traceback
folded into literal `\\n`s; run with log_level = "debug" on a terminal for whole tracebacks.
"""
from __future__ import annotations

import logging
import os
import sys
import traceback

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}


def stderr_is_journal(env=None) -> bool:
    """True when $JOURNAL_STREAM names the device:inode of our stderr."""
    env = os.environ if env is None else env
    value = env.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


class JournalFormatter(logging.Formatter):
    """`<priority>logger: message` with the traceback folded into the same line."""

    def __init__(self, journal: bool):
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s" if not journal
                         else "%(name)s: %(message)s")
        self.journal = journal

    def formatException(self, ei) -> str:
        if not self.journal:
            return super().formatException(ei)
        exc_type, exc, tb = ei
        where = ""
        if tb is not None:
            frame = traceback.extract_tb(tb)[-1]
            where = f" at {os.path.basename(frame.filename)}:{frame.lineno} in {frame.name}"
        return f"({exc_type.__name__}: {exc}{where})"

    def formatStack(self, stack_info: str) -> str:
        return "" if self.journal else super().formatStack(stack_info)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if self.journal and record.exc_info:          # "message\n(summary)" -> one line
            text = text.replace("\n(", " (", 1) if record.exc_text else text
        text = text.replace("\n", "\\n")
        if self.journal:
            prio = _PRIORITY.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)
            return f"<{prio}>{text}"
        return text


def setup_logging(level: str = "info", *, journal: bool | None = None) -> None:
    """Route every logger (kvmm's and its packages') to stderr at `level`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JournalFormatter(stderr_is_journal() if journal is None else journal))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
