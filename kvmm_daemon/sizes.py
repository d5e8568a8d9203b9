"""Byte sizes as people write them: "64MiB", "1.5G", "4096", "512k" (binary multiples)."""
from __future__ import annotations

import re

from kvmm_daemon.errors import ConfigError

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(value: str | int, *, what: str = "size") -> int:
    """Parse a byte size; raise ConfigError naming `what` on nonsense."""
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{what} must not be negative (got {value})")
        return value
    m = _SIZE_RE.match(str(value))
    if not m:
        raise ConfigError(f"{what} {value!r} is not a size; write e.g. 256MiB, 1G or 65536")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_size(n: int) -> str:
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:.4g} {unit}"
    return f"{n} B"
