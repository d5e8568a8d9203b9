"""Tokens the daemon decoded, read from its `stats` reply, to report figures per token.

`tokens_decoded` of the engine's statistics counts every token sampled (one per sequence
per step that reached its end: the tokens clients receive), read through the client library
once per interval; a daemon older than that counter gives `tokens_computed` instead (every
token a forward pass processed, prompt tokens included). When the daemon cannot be reached
the source says why once and reports None, and the report simply has no per-token figures.
"""
from __future__ import annotations


class TokenSource:
    """Reads the daemon's token counter.

    Attributes:
      socket: the daemon socket (None: the client's default).
      error: why the counter is unavailable, or None while it can be read.
    Invariant: once `error` is set, read() returns None without connecting again.
    """

    def __init__(self, socket: str | None, *, timeout: float = 2.0):
        self.socket = socket
        self.timeout = timeout
        self.error: str | None = None
        self._client = None

    def read(self) -> int | None:
        if self.error is not None:
            return None
        from kvmm_daemon.client import Client, ClientError
        try:
            if self._client is None:
                self._client = Client(self.socket, timeout=self.timeout)
            stats = self._client.stats()
        except (ClientError, OSError) as exc:
            self.error = f"daemon stats unreachable ({exc}); per-token figures omitted"
            self.close()
            return None
        tokens = stats.get("tokens_decoded", stats.get("tokens_computed"))
        if not isinstance(tokens, int):
            self.error = "daemon stats have neither tokens_decoded nor tokens_computed; per-token figures omitted"
            self.close()
            return None
        return tokens

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def token_delta(prev: int | None, cur: int | None) -> int | None:
    """Tokens of one interval; None when either read failed or the daemon restarted."""
    if prev is None or cur is None or cur < prev:
        return None
    return cur - prev
