"""Tokens the daemon decoded, read from its `stats` reply, to report figures per token.

`tokens_decoded` of the engine's statistics counts every token sampled (one per sequence
per step that reached its end: the tokens clients receive), read through the client library
once per interval; a daemon older than that counter gives `tokens_computed` instead (every
token a forward pass processed, prompt tokens included). When the daemon cannot be reached
the source says why once and reports None, and the report simply has no per-token figures.
"""
from __future__ import annotations

from kvmm_daemon.trace.daemon_query import DaemonQuery


class TokenSource(DaemonQuery):
    """Reads the daemon's token counter (see DaemonQuery for `error` and its invariant)."""

    def __init__(self, socket: str | None, *, timeout: float = 2.0):
        super().__init__(socket, "stats", "per-token figures", timeout=timeout)

    def read(self) -> int | None:
        stats = self.call()
        if stats is None:
            return None
        tokens = stats.get("tokens_decoded", stats.get("tokens_computed"))
        if not isinstance(tokens, int):
            self.fail("daemon stats have neither tokens_decoded nor tokens_computed")
            return None
        return tokens


def token_delta(prev: int | None, cur: int | None) -> int | None:
    """Tokens of one interval; None when either read failed or the daemon restarted."""
    if prev is None or cur is None or cur < prev:
        return None
    return cur - prev
