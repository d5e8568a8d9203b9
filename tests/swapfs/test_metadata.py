import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.swapfs.conftest import LAYOUT, payload, swap_size
from tests.swapfs.crash_writer import SESSIONS, session_blocks, session_tokens
from swapfs.errors import SwapNotFoundError
from swapfs.metadata import Metadata, SessionRow, SlotRecord
from swapfs.swap_space import SwapSpace

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def test_transactions_are_all_or_nothing(swap_dir):
    meta = Metadata(os.path.join(swap_dir, "m.sqlite"))
    meta.reset({"layout": "x"})
    row = SessionRow("s", 1, (1, 2, 3), 3, 1.0, 1.0, (SlotRecord(0, 1, 11),))
    meta.commit_session(row, row.blocks, [])
    bad = SessionRow("t", 1, (1,), 1, 1.0, 1.0, (SlotRecord(0, 2, 12),))  # slot 0 is taken
    with pytest.raises(Exception):
        meta.commit_session(bad, bad.blocks, [])
    assert meta.session("t") is None and meta.session("s") == row
    assert meta.used_slots() == {0: (1, "session", 11)}
    meta.close()


def _reported(lines: list[str]):
    """Per session: the last committed op, and the op in flight at the kill (if any)."""
    committed, in_flight = {}, None
    for line in lines:
        parts = line.split()
        if len(parts) != 3 or parts[0] not in "BC":
            continue
        op = (parts[1], int(parts[2]))
        if parts[0] == "B":
            in_flight = op
        else:
            committed[op[0]] = op[1]
            in_flight = None
    return committed, in_flight


def _check_store(swap_dir: str, committed: dict, in_flight, previous: dict) -> dict:
    """Reopen after the kill: each session is in its last committed state (or, for the one
    op in flight, the state after it) with every block intact. Returns the states."""
    space = SwapSpace(swap_dir, swap_size(48), LAYOUT, calibrate=False)
    states = {}
    try:
        for k, sid in enumerate(SESSIONS):
            allowed = {committed.get(sid, previous.get(sid, -1))}
            if in_flight is not None and in_flight[0] == sid:
                allowed.add(in_flight[1])
            try:
                info = space.session_info(sid)
                state = info.token_ids[-1]
            except SwapNotFoundError:
                info, state = None, -1
            assert state in allowed, (sid, state, allowed)
            states[sid] = state
            if info is not None:
                assert info.token_ids == tuple(session_tokens(k, state))
                out = [np.zeros(LAYOUT.block_bytes, np.uint8) for _ in range(info.num_blocks)]
                space.load_session(sid, out)          # raises on any torn/corrupt block
                want = session_blocks(list(info.token_ids))
                assert all((o == w).all() for o, w in zip(out, want)), sid
        for p in space.list_prefixes():
            out = np.zeros(LAYOUT.block_bytes, np.uint8)
            assert space.get_prefix_block(p.block_hash, out)
            assert (out == payload(p.block_hash)).all()
        st = space.statistics()
        assert st.swap_slots == 0 and not st.errors
        return states
    finally:
        space.close()


def test_sigkill_at_any_instant_keeps_old_or_new_state(swap_dir):
    rng = random.Random(4)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [HERE, ROOT] + os.environ.get("PYTHONPATH", "").split(os.pathsep)))
    version = 0
    seen_ops = 0
    states: dict = {}
    kills_mid_op = 0
    for cycle in range(20):
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "crash_writer.py"),
                                 swap_dir, str(version)], stdout=subprocess.PIPE, env=env,
                                text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.02, 0.25))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        lines = out.splitlines()
        committed, in_flight = _reported(lines)
        seen_ops += len(committed)
        kills_mid_op += in_flight is not None
        states = _check_store(swap_dir, committed, in_flight, states)
        version += 1000
    assert seen_ops >= 20       # the writer got real work done between kills
    assert kills_mid_op >= 5    # and was often killed inside an operation
