import pytest

from kvmm_daemon.trace.counters import BpfCounters


def test_minus_keeps_only_what_changed():
    prev = BpfCounters(totals={"faults_user": 10, "block_read_ios": 4}, hists={"block_read": {4: 3}},
                       syscalls={0: (5, 500, 0), 1: (2, 20, 1)}, fuse={(15, "sent"): (1, 10, 0)})
    cur = BpfCounters(totals={"faults_user": 15, "block_read_ios": 4, "offcpu_io_ns": 7},
                      hists={"block_read": {4: 3, 5: 2}, "offcpu_io": {3: 1}},
                      syscalls={0: (9, 900, 1), 1: (2, 20, 1), 17: (1, 5, 0)},
                      fuse={(15, "sent"): (1, 10, 0)}, io_uring={22: (3, 300, 0)})
    d = cur.minus(prev)
    assert d.total("faults_user") == 5 and d.total("block_read_ios") == 0 and d.total("offcpu_io_ns") == 7
    assert d.hists == {"block_read": {5: 2}, "offcpu_io": {3: 1}}
    assert d.syscalls == {0: (4, 400, 1), 17: (1, 5, 0)}
    assert d.fuse == {} and d.io_uring == {22: (3, 300, 0)}
    assert cur.minus(cur).syscalls == {} and all(v == 0 for v in cur.minus(cur).totals.values())


def test_counters_that_go_backwards_are_a_bug():
    with pytest.raises(AssertionError):
        BpfCounters(totals={"faults_user": 1}).minus(BpfCounters(totals={"faults_user": 2}))
    with pytest.raises(AssertionError):
        BpfCounters(syscalls={0: (1, 1, 0)}).minus(BpfCounters(syscalls={0: (2, 2, 0)}))


def test_unknown_counter_names_are_rejected():
    with pytest.raises(ValueError, match="unknown counters"):
        BpfCounters(totals={"bogus": 1})
    with pytest.raises(ValueError, match="unknown counters"):
        BpfCounters(hists={"bogus": {}})
