import pytest

from kvmm_daemon.trace.tracer import run_intervals


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now

    def sleep(self, s):
        assert 0 < s <= 0.05 + 1e-9
        self.now += s


class CountingSource:
    """Each read returns how often it was read; its sections report the difference."""
    name = "procfs"

    def __init__(self, vanish_after=None):
        self.reads = 0
        self.vanish_after = vanish_after

    def read(self):
        if self.vanish_after is not None and self.reads >= self.vanish_after:
            raise ProcessLookupError
        self.reads += 1
        return self.reads

    def sections(self, prev, cur):
        return {"process": {"reads": cur - prev}, "system": {}}


class FakeTokens:
    def __init__(self, values, error=None):
        self.values = list(values)
        self.error = error

    def read(self):
        return self.values.pop(0)


def test_count_intervals_and_timing():
    clock = FakeClock()
    out = list(run_intervals(CountingSource(), pids=[5], interval=0.5, count=3, done=lambda: False,
                             notes=["hello"], clock=clock, sleep=clock.sleep))
    assert [d["index"] for d in out] == [1, 2, 3]
    assert [d["t_s"] for d in out] == pytest.approx([0.5, 1.0, 1.5])
    assert all(d["interval_s"] == pytest.approx(0.5) for d in out)
    assert all(d["process"] == {"reads": 1} for d in out)
    assert out[0]["notes"] == ["hello"] and "notes" not in out[1]
    assert all(d["tokens"] is None for d in out)


def test_ends_early_with_a_partial_interval_when_done():
    clock = FakeClock()
    started = []
    done = lambda: clock.now >= 100.7
    out = list(run_intervals(CountingSource(), pids=[5], interval=0.5, count=None, done=done,
                             started=lambda: started.append(clock.now), clock=clock, sleep=clock.sleep))
    assert started == [100.0]
    assert len(out) == 2 and out[1]["interval_s"] == pytest.approx(0.2, abs=0.051)


def test_tokens_per_interval_and_their_error_note():
    clock = FakeClock()
    out = list(run_intervals(CountingSource(), pids=[5], interval=1, count=2, done=lambda: False,
                             tokens=FakeTokens([10, 30, 70]), clock=clock, sleep=clock.sleep))
    assert [d["tokens"] for d in out] == [20, 40]
    assert out[0]["per_token"] == {} and out[1]["per_token"] == {}   # procfs sections hold no known keys
    failing = FakeTokens([None, None], error="daemon stats unreachable (x); per-token figures omitted")
    out = list(run_intervals(CountingSource(), pids=[5], interval=1, count=1, done=lambda: False,
                             tokens=failing, clock=clock, sleep=clock.sleep))
    assert out[0]["notes"] == [failing.error] and out[0]["tokens"] is None


def test_a_vanished_process_ends_the_loop():
    clock = FakeClock()
    out = list(run_intervals(CountingSource(vanish_after=2), pids=[5], interval=1, count=5, done=lambda: False,
                             clock=clock, sleep=clock.sleep))
    assert len(out) == 1


def test_bad_arguments():
    with pytest.raises(ValueError, match="not positive"):
        next(run_intervals(CountingSource(), pids=[1], interval=0, count=1, done=lambda: True))
    with pytest.raises(ValueError, match="below 1"):
        next(run_intervals(CountingSource(), pids=[1], interval=1, count=0, done=lambda: True))
