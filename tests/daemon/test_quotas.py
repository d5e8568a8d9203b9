"""SessionLedger (quotas.py) and the swap-full eviction policy (session_evictor.py)."""
from __future__ import annotations

import errno
from dataclasses import dataclass

import pytest

from kvmm_daemon.daemon.quotas import SessionLedger
from kvmm_daemon.engine.session_evictor import pick_victim


@dataclass
class _S:
    session_id: str
    num_tokens: int = 32
    owner: int = 0
    busy: bool = False
    last_used: float = 0.0


class _Engine:
    def __init__(self):
        self.snapshot = []

    def list_sessions(self):
        return list(self.snapshot)


def test_sessions_count_at_admission_not_at_the_next_snapshot():
    engine, steps = _Engine(), [0]
    ledger = SessionLedger(engine, lambda: steps[0], max_sessions=2, quota_bytes=None,
                           block_bytes=100, block_size=16)
    ledger.add("1000:a")
    ledger.add("1000:b")                  # the engine has seen neither yet
    assert "max_sessions_per_uid" in ledger.room_for(1000)
    assert ledger.room_for(1001) is None
    steps[0] = 5                          # steps later the engine does not hold "a" (evicted)
    engine.snapshot = [_S("1000:b")]
    assert ledger.room_for(1000) is None and "1000:a" not in ledger


def test_swap_bytes_quota_and_import_errno():
    engine = _Engine()
    engine.snapshot = [_S("7:a", num_tokens=40)]           # 3 blocks of 16
    ledger = SessionLedger(engine, lambda: 0, max_sessions=9, quota_bytes=500,
                           block_bytes=100, block_size=16)
    assert ledger.bytes_of(7) == 300
    assert ledger.room_for(7, 1, 200) is None
    with pytest.raises(OSError) as err:
        ledger.check_import(7, 1, 201)
    assert err.value.errno == errno.EDQUOT and "swap_quota_per_uid" in err.value.strerror


@dataclass
class _Info:
    session_id: str
    owner_uid: int
    num_blocks: int


def test_the_uid_over_its_share_loses_its_oldest_idle_session():
    sessions = {"1:a": _S("1:a", last_used=1.0), "2:x": _S("2:x", last_used=0.5, busy=True),
                "2:y": _S("2:y", last_used=3.0), "2:z": _S("2:z", last_used=2.0)}
    stored = [_Info("1:a", 1, 2), _Info("2:x", 2, 4), _Info("2:y", 2, 3), _Info("2:z", 2, 3)]
    v = pick_victim(sessions, stored, capacity_bytes=12 * 10, block_bytes=10)
    assert v.session_id == "2:z" and v.owner == 2 and v.over_share_bytes == 100 - 60
    assert pick_victim({}, [], 100, 10) is None
