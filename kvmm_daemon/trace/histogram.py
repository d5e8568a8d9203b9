"""log2 histograms as the BPF side builds them, decoded, summarised and printed.

The kernel side increments slot `bpf_log2l(value)`, i.e. floor(log2(value)) + 1 for value
>= 1 (and slot 1 for 0 as well, a bcc quirk), so slot s holds values in
[2**(s-1), 2**s - 1] and slot 0 is never used by it. Here a histogram is a plain
`{slot: count}` dict; `buckets()` turns it into rows a reader can take at face value, and
`format_log2_hist` prints the same table as bcc's `print_log2_hist` (tools/biolatency.py)
so the output reads like the bcc tools'. Quantiles are upper bounds of the bucket that holds
them: a log2 histogram knows no more.
"""
from __future__ import annotations

from typing import Mapping

Hist = Mapping[int, int]


def slot_range(slot: int) -> tuple[int, int]:
    """The values [lo, hi] that fall into `slot`."""
    if slot < 0:
        raise ValueError(f"log2 histogram slot {slot} is negative")
    return (1 << slot) >> 1, (1 << slot) - 1


def subtract(cur: Hist, prev: Hist) -> dict[int, int]:
    """cur - prev of two cumulative histograms; empty slots are dropped."""
    out = {s: n - prev.get(s, 0) for s, n in cur.items() if n - prev.get(s, 0)}
    assert all(n > 0 for n in out.values()), "a cumulative histogram went backwards"
    return out


def merge(*hists: Hist) -> dict[int, int]:
    out: dict[int, int] = {}
    for h in hists:
        for s, n in h.items():
            out[s] = out.get(s, 0) + n
    return out


def total(h: Hist) -> int:
    return sum(h.values())


def quantile_upper(h: Hist, q: float) -> int | None:
    """Upper bound of the bucket holding the q-quantile (0 < q <= 1); None when empty."""
    if not 0 < q <= 1:
        raise ValueError(f"quantile {q} is outside (0, 1]")
    n = total(h)
    if n == 0:
        return None
    rank = q * n
    seen = 0
    for slot in sorted(h):
        seen += h[slot]
        if seen >= rank:
            return slot_range(slot)[1]
    raise AssertionError("quantile past the last bucket")


def buckets(h: Hist) -> list[dict]:
    """Rows {lo, hi, count} from the lowest to the highest non-empty slot, gaps included."""
    if not h:
        return []
    lo, hi = min(h), max(h)
    return [dict(zip(("lo", "hi"), slot_range(s)), count=h.get(s, 0)) for s in range(lo, hi + 1)]


def from_buckets(rows: list[dict]) -> dict[int, int]:
    """The inverse of buckets(): {slot: count} of the non-empty rows."""
    out = {}
    for r in rows:
        slot = r["lo"].bit_length()
        assert slot_range(slot) == (r["lo"], r["hi"]), f"row {r} is not a log2 bucket"
        if r["count"]:
            out[slot] = r["count"]
    return out


def summary(h: Hist) -> dict:
    """The JSON form of one histogram: count, p50/p99 bucket upper bounds and the rows."""
    return {"count": total(h), "p50_le": quantile_upper(h, 0.5), "p99_le": quantile_upper(h, 0.99),
            "buckets": buckets(h)}


def format_log2_hist(h: Hist, label: str, width: int = 40) -> str:
    """The bcc print_log2_hist table ("usecs : count distribution") as a string."""
    rows = buckets(h)
    if not rows:
        return ""
    peak = max(r["count"] for r in rows)
    lines = [f"{label:>20} : count     distribution"]
    for r in rows:
        stars = round(width * r["count"] / peak) if peak else 0
        lines.append(f"{r['lo']:>10} -> {r['hi']:<10}: {r['count']:<9} |{'*' * stars:<{width}}|")
    return "\n".join(lines)
