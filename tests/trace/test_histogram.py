import pytest
from hypothesis import given, strategies as st

from kvmm_daemon.trace import histogram as H


def test_slot_ranges_match_bpf_log2l():
    # bpf_log2l(v) = floor(log2(v)) + 1: 1 -> 1, 2..3 -> 2, 4..7 -> 3
    assert H.slot_range(0) == (0, 0)
    assert H.slot_range(1) == (1, 1)
    assert H.slot_range(2) == (2, 3)
    assert H.slot_range(3) == (4, 7)
    assert H.slot_range(11) == (1024, 2047)
    for v in range(1, 5000):
        lo, hi = H.slot_range(v.bit_length())
        assert lo <= v <= hi
    with pytest.raises(ValueError):
        H.slot_range(-1)


def test_buckets_fill_gaps_and_summary():
    h = {4: 10, 7: 1}
    rows = H.buckets(h)
    assert [(r["lo"], r["hi"], r["count"]) for r in rows] == [(8, 15, 10), (16, 31, 0), (32, 63, 0), (64, 127, 1)]
    s = H.summary(h)
    assert s["count"] == 11 and s["p50_le"] == 15 and s["p99_le"] == 127
    assert H.summary({}) == {"count": 0, "p50_le": None, "p99_le": None, "buckets": []}


def test_quantile_bounds():
    h = {1: 50, 2: 49, 10: 1}
    assert H.quantile_upper(h, 0.5) == 1
    assert H.quantile_upper(h, 0.99) == 3
    assert H.quantile_upper(h, 1.0) == 1023
    with pytest.raises(ValueError):
        H.quantile_upper(h, 0)


def test_subtract_and_merge():
    assert H.subtract({3: 5, 4: 2, 5: 1}, {3: 5, 4: 1}) == {4: 1, 5: 1}
    assert H.merge({1: 1, 2: 2}, {2: 3}, {}) == {1: 1, 2: 5}
    with pytest.raises(AssertionError):
        H.subtract({3: 1}, {3: 2})


@given(st.dictionaries(st.integers(0, 40), st.integers(1, 10**9), max_size=12))
def test_from_buckets_inverts_buckets(h):
    assert H.from_buckets(H.buckets(h)) == h
    assert sum(r["count"] for r in H.buckets(h)) == H.total(h)


def test_format_like_bcc():
    text = H.format_log2_hist({4: 20, 5: 10}, "usecs", width=20)
    lines = text.splitlines()
    assert lines[0] == "               usecs : count     distribution"
    assert lines[1] == "         8 -> 15        : 20        |********************|"
    assert lines[2] == "        16 -> 31        : 10        |**********          |"
    assert H.format_log2_hist({}, "usecs") == ""
