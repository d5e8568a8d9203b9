"""Stateful property test of SlotMap.

Random allocate (swap or staged), commit (staged -> session/prefix), set_crc, release,
release_live with refs that may be stale (freed, or freed and the slot reused), pin and
unpin, against a plain model of what each slot holds. After every rule the map's own
`check_invariants()` runs and its answers are compared with the model; besides the
bookkeeping the test checks what matters to a reader: a pinned slot is never handed out
(even after it was released), a reused slot never comes back with a generation a reader
could still hold, and a stale ref never releases the slot's new content.
"""
from collections import Counter

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from swapfs.records import SlotRef
from swapfs.slot_map import SlotMap

NUM_SLOTS = 10
STORED = {7: ("session", 3, 0xAB), 2: ("prefix", 5, 0xCD)}   # as loaded from metadata


class SlotMapMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.map = SlotMap(NUM_SLOTS, STORED)
        # the model: slot -> [kind, generation, crc] of owned slots; pins; released-while-
        # pinned slots; every ref ever handed out (for stale-ref rules)
        self.owned = {s: [k, g, c] for s, (k, g, c) in STORED.items()}
        self.pins: Counter[int] = Counter()
        self.deferred: set[int] = set()
        self.refs: list[SlotRef] = [SlotRef(s, g) for s, (_k, g, _c) in STORED.items()]
        self.max_gen = max(g for _k, g, _c in STORED.values())

    def _free(self):
        return sorted(set(range(NUM_SLOTS)) - set(self.owned) - self.deferred)

    def _of_kind(self, kind):
        return sorted(s for s, (k, _g, _c) in self.owned.items() if k == kind)

    def _release_in_model(self, slot):
        del self.owned[slot]
        if self.pins[slot]:
            self.deferred.add(slot)
            event("release deferred by a pin")

    # --- rules ---------------------------------------------------------------------------

    @rule(n=st.integers(0, 4), kind=st.sampled_from(["swap", "staged"]))
    def allocate(self, n, kind):
        free = self._free()
        before = self.map.statistics()
        refs = self.map.allocate(n, kind)
        if n > len(free):
            assert refs is None
            assert self.map.statistics() == before
            event("allocate refused")
            return
        assert [r.slot_id for r in refs] == free[:n], "lowest free slots first"
        gens = [r.generation for r in refs]
        assert gens == sorted(gens) and len(set(gens)) == n
        assert all(g > self.max_gen for g in gens), "a generation handed out before"
        for r in refs:
            assert not self.pins[r.slot_id]
            self.owned[r.slot_id] = [kind, r.generation, 0]
        if gens:
            self.max_gen = gens[-1]
        self.refs.extend(refs)

    @precondition(lambda self: self._of_kind("staged"))
    @rule(data=st.data(), kind=st.sampled_from(["session", "prefix"]))
    def commit(self, data, kind):
        staged = self._of_kind("staged")
        slots = data.draw(st.lists(st.sampled_from(staged), min_size=1, unique=True))
        self.map.commit(slots, kind)
        for s in slots:
            self.owned[s][0] = kind

    @precondition(lambda self: self.owned)
    @rule(data=st.data(), crc=st.integers(0, 2**64 - 1))
    def set_crc(self, data, crc):
        slot = data.draw(st.sampled_from(sorted(self.owned)))
        self.map.set_crc(slot, crc)
        self.owned[slot][2] = crc

    @precondition(lambda self: self.owned)
    @rule(data=st.data())
    def release(self, data):
        slots = data.draw(st.lists(st.sampled_from(sorted(self.owned)), min_size=1, unique=True))
        self.map.release(slots)
        for s in slots:
            self._release_in_model(s)

    @precondition(lambda self: self.refs)
    @rule(data=st.data(), kind=st.sampled_from([None, "swap", "staged", "session", "prefix"]))
    def release_live(self, data, kind):
        refs = data.draw(st.lists(st.sampled_from(self.refs), max_size=4))
        want = []
        for r in refs:
            o = self.owned.get(r.slot_id)
            if o is not None and o[1] == r.generation and kind in (None, o[0]) and \
                    r.slot_id not in want:
                want.append(r.slot_id)
        if len(want) < len(set(r.slot_id for r in refs)):
            event("stale ref ignored")
        assert self.map.release_live(refs, kind) == want
        for s in want:
            self._release_in_model(s)

    @precondition(lambda self: self.owned)
    @rule(data=st.data())
    def pin(self, data):
        slots = data.draw(st.lists(st.sampled_from(sorted(self.owned)), min_size=1, max_size=3))
        self.map.pin(slots)
        self.pins.update(slots)

    @precondition(lambda self: +self.pins)
    @rule(data=st.data())
    def unpin(self, data):
        slot = data.draw(st.sampled_from(sorted(+self.pins)))
        self.map.unpin([slot])
        self.pins[slot] -= 1
        if not self.pins[slot] and slot in self.deferred:
            self.deferred.discard(slot)
            event("deferred slot freed by its last unpin")

    @rule(slot=st.integers(0, NUM_SLOTS - 1))
    def misuse_is_refused(self, slot):
        """Pinning a slot that holds nothing, unpinning an unpinned one: typed errors, no
        change."""
        before = self.map.statistics()
        if slot not in self.owned:
            with pytest.raises(KeyError):
                self.map.pin([slot])
        if not self.pins[slot]:
            with pytest.raises(KeyError):
                self.map.unpin([slot])
        with pytest.raises(ValueError):
            self.map.allocate(1, "session")
        assert self.map.statistics() == before

    # --- invariants ----------------------------------------------------------------------

    @invariant()
    def agrees_with_the_model(self):
        self.map.check_invariants()
        st_ = self.map.statistics()
        assert st_.capacity == NUM_SLOTS
        assert st_.free == len(self._free()) == self.map.num_free
        assert st_.deferred == len(self.deferred)
        assert st_.pinned == len(+self.pins)
        assert dict(st_.owned) == dict(Counter(k for k, _g, _c in self.owned.values()))
        assert self.map.num_owned == len(self.owned)
        for slot in range(NUM_SLOTS):
            o = self.owned.get(slot)
            assert self.map.kind(slot) == (o[0] if o else None)
            assert self.map.is_pinned(slot) == bool(self.pins[slot])
            if o is not None:
                assert self.map.ref(slot) == SlotRef(slot, o[1], o[2])
                assert self.map.is_live(SlotRef(slot, o[1]), o[0])

    def teardown(self):
        self.map.unpin(list((+self.pins).elements()))
        self.map.release(list(self.owned))
        self.map.check_invariants()
        st_ = self.map.statistics()
        assert st_.free == NUM_SLOTS and st_.deferred == st_.pinned == 0


SlotMapMachine.TestCase.settings = settings(
    max_examples=500, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestSlotMapStateful = SlotMapMachine.TestCase


def test_loaded_slots_must_fit_the_area():
    with pytest.raises(ValueError, match="does not fit"):
        SlotMap(4, {4: ("session", 1, 0)})
    with pytest.raises(ValueError, match="does not fit"):
        SlotMap(4, {0: ("swap", 1, 0)})          # swap slots are never stored
    with pytest.raises(ValueError, match="same generation"):
        SlotMap(4, {0: ("session", 1, 0), 1: ("prefix", 1, 0)})


def test_generations_continue_after_the_stored_ones():
    m = SlotMap(4, {1: ("prefix", 41, 0)})
    assert m.allocate(2, "swap") == [SlotRef(0, 42), SlotRef(2, 43)]


def test_commit_takes_only_staged_slots():
    m = SlotMap(2)
    (ref,) = m.allocate(1, "swap")
    with pytest.raises(ValueError, match="not staged"):
        m.commit([ref.slot_id], "session")
    with pytest.raises(ValueError):
        m.commit([ref.slot_id], "swap")
