"""sd_notify without libsystemd: READY=1, STATUS=, WATCHDOG=1, STOPPING=1 over $NOTIFY_SOCKET.

The protocol is one datagram of newline-separated KEY=VALUE lines sent to the AF_UNIX socket
named by $NOTIFY_SOCKET (a path, or an abstract name written with a leading '@'); see
sd_notify(3). The watchdog interval comes from $WATCHDOG_USEC (honoured only when
$WATCHDOG_PID is unset or ours); a service pings at least twice per interval, so
`ping_interval_s` is half of it. Without $NOTIFY_SOCKET every call does nothing, so the daemon
runs the same outside systemd.

Prior art: libsystemd's sd_notify.c (abstract-name handling, the WATCHDOG_PID check).
Left out: passing file descriptors to the store (FDSTORE=1) and MAINPID= (we are the main pid).
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from typing import Mapping

log = logging.getLogger("kvmm.notify")


@dataclass(frozen=True, slots=True)
class NotifierStatistics:
    enabled: bool
    watchdog_interval_s: float | None
    sent: int
    failed: int


class SystemdNotifier:
    """Sends state changes to the service manager.

    Attributes:
      address: the socket address to send to, or None when not run by systemd (then every
        method is a no-op and `sent` stays 0).
      watchdog_usec: the WatchdogSec of the unit in microseconds, or None when no watchdog.
      sent / failed: datagrams delivered / refused (a refused one is logged once, not raised:
        losing a notification must not take the daemon down).
    """

    def __init__(self, address: str | bytes | None, watchdog_usec: int | None = None):
        self.address = address
        self.watchdog_usec = watchdog_usec
        self.sent = 0
        self.failed = 0
        self._sock: socket.socket | None = None
        if address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, unset: bool = True) -> SystemdNotifier:
        """Read NOTIFY_SOCKET/WATCHDOG_USEC/WATCHDOG_PID; remove them from os.environ so that
        child processes do not notify in our name (what sd_notify's unset_environment does)."""
        env = os.environ if env is None else env
        raw = env.get("NOTIFY_SOCKET") or None
        address: str | bytes | None = None
        if raw is not None:
            if raw.startswith("@"):
                address = b"\0" + raw[1:].encode()
            elif raw.startswith("/"):
                address = raw
            else:
                log.warning("ignoring NOTIFY_SOCKET=%r: neither a path nor an abstract name", raw)
        usec: int | None = None
        wd_pid = env.get("WATCHDOG_PID")
        if env.get("WATCHDOG_USEC") and (not wd_pid or wd_pid == str(os.getpid())):
            try:
                usec = int(env["WATCHDOG_USEC"])
            except ValueError:
                log.warning("ignoring WATCHDOG_USEC=%r: not an integer", env["WATCHDOG_USEC"])
            else:
                usec = usec if usec > 0 else None
        if unset and env is os.environ:
            for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                os.environ.pop(var, None)
        return cls(address, usec)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    @property
    def ping_interval_s(self) -> float | None:
        """How often to send WATCHDOG=1: half the unit's WatchdogSec, or None."""
        return None if self.watchdog_usec is None else self.watchdog_usec / 2e6

    def notify(self, **fields: str | int) -> bool:
        """Send one datagram of KEY=VALUE lines (keys upper-cased); True if delivered."""
        if self._sock is None:
            return False
        payload = "\n".join(f"{k.upper()}={v}" for k, v in fields.items()).encode()
        try:
            self._sock.sendto(payload, self.address)
        except OSError as exc:
            self.failed += 1
            if self.failed == 1:
                log.warning("sd_notify to %r failed: %s", self.address, exc)
            return False
        self.sent += 1
        return True

    def ready(self, status: str) -> bool:
        return self.notify(ready=1, status=status)

    def status(self, status: str) -> bool:
        return self.notify(status=status)

    def watchdog(self) -> bool:
        return self.watchdog_usec is not None and self.notify(watchdog=1)

    def stopping(self, status: str = "draining") -> bool:
        return self.notify(stopping=1, status=status)

    def statistics(self) -> NotifierStatistics:
        return NotifierStatistics(self.enabled, self.ping_interval_s, self.sent, self.failed)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
