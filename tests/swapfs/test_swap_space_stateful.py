"""Stateful property test of SwapSpace: its three users of the SlotMap (swap, prefix tier,
stored sessions) against the metadata and against what a reader must get.

Random swap-out/in/free, session saves (incremental; some begun and finished later, so a
delete or another save in between makes them conflict), deletes, snapshots read after their
session was deleted or saved again, prefix puts/gets/drops, and close + reopen, on a real
SwapSpace of a few slots so that eviction, SwapFullError and deferred frees happen. After
every rule the SlotMap checks its own invariants and must agree slot for slot with the
metadata (committed session and prefix slots, generations, checksums), with the prefix
tier and the sessions, with the live swap handles, the pending saves and the snapshots held.
A block's payload depends only on the tokens up to its end, as real KV does, so every read
can be checked against the tokens it belongs to.
"""
from __future__ import annotations

import shutil
import tempfile
from collections import Counter

import numpy as np
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tests.swapfs.conftest import LAYOUT, payload, swap_size
from swapfs.errors import SwapConflictError, SwapFullError
from swapfs.swap_space import SwapSpace

NUM_SLOTS = 10
BS = LAYOUT.block_size
BB = LAYOUT.block_bytes
SIDS = ["a", "b", "c"]
HASHES = [bytes([i]) * 32 for i in range(6)]


def _block(tokens: tuple[int, ...], i: int, nkv: int) -> np.ndarray:
    return payload(("kv", tokens[:min((i + 1) * BS, nkv)]))


def _bufs(n: int) -> list[np.ndarray]:
    return [np.zeros(BB, np.uint8) for _ in range(n)]


class SwapSpaceMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="kvmm-swapfs-stateful-", dir="/var/tmp")
        self.space = self._open()
        self.swapped: dict = {}        # SwapHandle -> seed of its payload
        self.freed: list = []          # handles freed or swapped in (stale now)
        self.sessions: dict[str, tuple[tuple[int, ...], int]] = {}   # sid -> (tokens, nkv)
        self.version: dict[str, int] = {}   # sid -> changes whenever its blocks change
        self.pending: list = []        # (PendingCommit, sid, tokens, nkv, version at begin)
        self.snaps: list = []          # (Snapshot, expected payloads)
        self.seq = 0

    def _open(self) -> SwapSpace:
        return SwapSpace(self.dir, swap_size(NUM_SLOTS), LAYOUT, io_threads=2, calibrate=False)

    def _evictable(self) -> int:
        sp = self.space
        return sum(not sp._slots.is_pinned(s) for s in sp._prefixes._lru.values())

    def _keep(self, sid, tokens, nkv) -> int:
        """The blocks a save keeps from the stored version (as the docs promise)."""
        if sid not in self.sessions:
            return 0
        old_tokens, old_nkv = self.sessions[sid]
        common = 0
        while common < min(old_nkv, nkv) and old_tokens[common] == tokens[common]:
            common += 1
        return min(common // BS, LAYOUT.blocks_for(old_nkv))

    def _session_changes(self, sid, tokens, nkv) -> bool:
        """A save of (tokens, nkv) gives `sid` other blocks than it has (pending saves of the
        old version conflict then)."""
        if sid not in self.sessions:
            return True
        old_blocks = LAYOUT.blocks_for(self.sessions[sid][1])
        return not (self._keep(sid, tokens, nkv) == old_blocks == LAYOUT.blocks_for(nkv))

    def _committed(self, sid, tokens, nkv):
        if self._session_changes(sid, tokens, nkv):
            self.seq += 1
            self.version[sid] = self.seq
        self.sessions[sid] = (tokens, nkv)

    def _finish(self, pending, sid, tokens, nkv, version) -> None:
        """Finish a deferred save: it conflicts iff the session's blocks changed since."""
        conflicts = self.version.get(sid) != version
        try:
            self.space.finish(pending)
        except SwapConflictError:
            assert conflicts, "a save conflicted though its session did not change"
            event("deferred save: conflict")
            return
        assert not conflicts, "a save committed over a session changed meanwhile"
        self._committed(sid, tokens, nkv)

    # --- swap ----------------------------------------------------------------------------

    @rule(n=st.integers(1, 3))
    def swap_out(self, n):
        room = self.space._slots.num_free + self._evictable()
        seeds = [("swap", self.seq, i) for i in range(n)]
        self.seq += 1
        try:
            handles = self.space.swap_out([payload(s) for s in seeds])
        except SwapFullError:
            assert room < n
            event("swap_out: full")
            return
        assert room >= n
        self.swapped.update(zip(handles, seeds))

    @precondition(lambda self: self.swapped)
    @rule(data=st.data(), release=st.booleans())
    def swap_in(self, data, release):
        handles = data.draw(st.lists(st.sampled_from(sorted(self.swapped, key=repr)),
                                     min_size=1, max_size=3, unique=True))
        into = _bufs(len(handles))
        self.space.swap_in(handles, into, release=release)
        for h, buf in zip(handles, into):
            assert (buf == payload(self.swapped[h])).all()
            if release:
                del self.swapped[h]
                self.freed.append(h)

    @precondition(lambda self: self.swapped or self.freed)
    @rule(data=st.data())
    def free(self, data):
        pool = sorted(self.swapped, key=repr) + self.freed
        handles = data.draw(st.lists(st.sampled_from(pool), min_size=1, max_size=3))
        self.space.free(handles)
        for h in handles:
            if self.swapped.pop(h, None) is not None:
                self.freed.append(h)
            else:
                event("free: stale handle ignored")

    # --- sessions ------------------------------------------------------------------------

    @rule(sid=st.sampled_from(SIDS), data=st.data(), deferred=st.booleans())
    def save_session(self, sid, data, deferred):
        old = self.sessions.get(sid, ((), 0))[0]
        cut = data.draw(st.integers(0, len(old)))          # keep a prefix, change the rest
        tokens = old[:cut] + tuple(data.draw(st.lists(st.integers(0, 3), max_size=2 * BS)))
        nkv = data.draw(st.integers(max(0, len(tokens) - 1), len(tokens)))
        nblocks = LAYOUT.blocks_for(nkv)
        need = nblocks - self._keep(sid, tokens, nkv)
        room = self.space._slots.num_free + self._evictable()
        payloads = [_block(tokens, i, nkv) for i in range(nblocks)]
        try:
            pending = self.space.begin_save_session(sid, 0, tokens, payloads,
                                                    num_kv_tokens=nkv, copy=True)
        except SwapFullError:
            assert room < need
            event("save: full")
            return
        assert room >= need
        if deferred:
            self.pending.append((pending, sid, tokens, nkv, self.version.get(sid)))
            return
        self.space.finish(pending)
        self._committed(sid, tokens, nkv)

    @precondition(lambda self: self.pending)
    @rule(data=st.data())
    def finish_pending(self, data):
        i = data.draw(st.integers(0, len(self.pending) - 1))
        self._finish(*self.pending.pop(i))

    @precondition(lambda self: self.sessions)
    @rule(data=st.data())
    def load_session(self, data):
        sid = data.draw(st.sampled_from(sorted(self.sessions)))
        tokens, nkv = self.sessions[sid]
        into = _bufs(LAYOUT.blocks_for(nkv))
        info = self.space.load_session(sid, into)
        assert (info.token_ids, info.num_kv_tokens) == (tokens, nkv)
        for i, buf in enumerate(into):
            assert (buf == _block(tokens, i, nkv)).all()

    @precondition(lambda self: self.sessions)
    @rule(data=st.data())
    def delete_session(self, data):
        sid = data.draw(st.sampled_from(sorted(self.sessions)))
        self.space.delete_session(sid)
        del self.sessions[sid], self.version[sid]

    @precondition(lambda self: self.sessions)
    @rule(data=st.data())
    def take_snapshot(self, data):
        sid = data.draw(st.sampled_from(sorted(self.sessions)))
        tokens, nkv = self.sessions[sid]
        snap = self.space.session_snapshot(sid)
        self.snaps.append((snap, [_block(tokens, i, nkv) for i in range(len(snap.refs))]))

    @precondition(lambda self: self.snaps)
    @rule(data=st.data(), release=st.booleans())
    def read_snapshot(self, data, release):
        """A snapshot reads as it was taken, whatever happened to its session since."""
        i = data.draw(st.integers(0, len(self.snaps) - 1))
        snap, want = self.snaps[i]
        into = _bufs(len(want))
        assert self.space.read_refs(snap.refs, into) == [None] * len(want)
        assert all((b == w).all() for b, w in zip(into, want))
        if release:
            self.space.release_snapshot(snap)
            del self.snaps[i]

    # --- prefix blocks -------------------------------------------------------------------

    @rule(hashes=st.lists(st.sampled_from(HASHES), min_size=1, max_size=4, unique=True))
    def put_prefixes(self, hashes):
        self.space.put_prefix_blocks([(h, payload(("prefix", h))) for h in hashes])

    @rule(hashes=st.lists(st.sampled_from(HASHES), min_size=1, max_size=4, unique=True))
    def get_prefixes(self, hashes):
        stored = self.space.has_prefix_blocks(hashes)
        into = _bufs(len(hashes))
        assert self.space.get_prefix_blocks(hashes, into) == stored
        for h, buf in zip(hashes[:stored], into):
            assert (buf == payload(("prefix", h))).all()
        event("prefix get: hit" if stored else "prefix get: miss")

    @rule(hashes=st.lists(st.sampled_from(HASHES), min_size=1, max_size=3))
    def drop_prefixes(self, hashes):
        stored = {h for h in hashes if self.space.has_prefix_blocks([h])}
        assert self.space.drop_prefix_blocks(hashes) == len(stored)
        assert not any(self.space.has_prefix_blocks([h]) for h in hashes)

    # --- restart -------------------------------------------------------------------------

    @rule()
    def reopen(self):
        """Close and open again: swap handles die, sessions and prefix blocks stay."""
        for p in self.pending:
            self._finish(*p)
        self.pending.clear()
        for snap, _want in self.snaps:
            self.space.release_snapshot(snap)
        self.snaps.clear()
        prefixes = {i.block_hash for i in self.space.list_prefixes()}
        self.space.close()
        self.space = self._open()
        self.freed.extend(self.swapped)
        self.swapped.clear()
        assert {i.block_hash for i in self.space.list_prefixes()} == prefixes

    # --- invariants ----------------------------------------------------------------------

    @invariant()
    def slot_map_agrees_with_its_users(self):
        sp = self.space
        slots = sp._slots
        slots.check_invariants()
        owner = {s: slots.kind(s) for s in range(NUM_SLOTS) if slots.kind(s) is not None}
        by_kind = lambda k: {s for s, kind in owner.items() if kind == k}  # noqa: E731
        rows = {sid: sp._meta.session(sid) for sid in sp._meta.session_ids()}
        session_slots = [b.slot_id for r in rows.values() for b in r.blocks]
        assert set(rows) == set(self.sessions) == set(sp._sessions._slots_of)
        assert sorted(session_slots) == sorted(by_kind("session"))
        assert {sid: tuple(b.slot_id for b in r.blocks) for sid, r in rows.items()} == \
            sp._sessions._slots_of
        assert sorted(sp._prefixes._lru.values()) == sorted(by_kind("prefix"))
        assert {h: s for h, s, _c, _u in sp._meta.prefixes()} == dict(sp._prefixes._lru)
        committed = {s: (slots.ref(s).generation, slots.kind(s), slots.ref(s).crc)
                     for s in by_kind("session") | by_kind("prefix")}
        assert sp._meta.used_slots() == committed          # generations and checksums too
        assert {(h.slot_id, h.generation) for h in self.swapped} == \
            {(s, slots.ref(s).generation) for s in by_kind("swap")}
        assert sorted(r.slot_id for p in self.pending for r in p[0].refs) == \
            sorted(by_kind("staged"))
        pins = Counter(r.slot_id for snap, _w in self.snaps for r in snap.refs)
        assert {s for s in range(NUM_SLOTS) if slots.is_pinned(s)} == set(pins)
        stats = sp.statistics()
        assert stats.free_slots + len(owner) == NUM_SLOTS
        assert (stats.swap_slots, stats.prefix_slots, stats.session_slots, stats.sessions) == \
            (len(by_kind("swap")), len(by_kind("prefix")), len(by_kind("session")),
             len(self.sessions))

    def teardown(self):
        try:
            for p in self.pending:
                try:
                    self.space.finish(p[0])
                except SwapConflictError:
                    pass
            for snap, _w in self.snaps:
                self.space.release_snapshot(snap)
            self.space.free(list(self.swapped))
            self.space._slots.check_invariants()
            self.space.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


SwapSpaceMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestSwapSpaceStateful = SwapSpaceMachine.TestCase
