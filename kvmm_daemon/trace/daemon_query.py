"""DaemonQuery: one operation asked of the daemon once per interval, over one connection.

The token counter (tokens.py) and the step trace (steps.py) are read this way. A daemon that
cannot be reached (or is too old to know the op) is not an error of the trace: the query says
why once, in `error`, and from then on answers None without connecting again, and the report
goes on without that part.
"""
from __future__ import annotations


class DaemonQuery:
    """Attributes:
      socket: the daemon socket (None: the client's default).
      error: why the query cannot be answered, or None while it can.
    Invariant: once `error` is set, call() returns None without connecting again; `_client`
    is None after close() or an error.
    """

    def __init__(self, socket: str | None, op: str, what: str, *, timeout: float = 2.0):
        self.socket = socket
        self.op = op                # a method of kvmm_daemon.client.Client (an OPERATIONS name)
        self.what = what            # what is left out without it, for the error
        self.timeout = timeout
        self.error: str | None = None
        self._client = None

    def call(self):
        if self.error is not None:
            return None
        from kvmm_daemon.client import Client, ClientError, UnknownOperation
        try:
            if self._client is None:
                self._client = Client(self.socket, timeout=self.timeout)
            return getattr(self._client, self.op)()
        except UnknownOperation:
            self.fail(f"the daemon does not know the {self.op!r} op (an older kvmm)")
        except (ClientError, OSError) as exc:
            self.fail(f"daemon {self.op} unreachable ({exc})")
        return None

    def fail(self, why: str) -> None:
        self.error = f"{why}; {self.what} omitted"
        self.close()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
