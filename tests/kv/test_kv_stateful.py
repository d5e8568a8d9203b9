"""Stateful property test of KVCacheManager over BlockPool.

Random allocate (with shared prefixes, so prefix hits and evictions under pressure happen),
append, run (drain copies, write KV, commit), fork and free. A shadow arena records which
token's KV each slot holds, so besides the bookkeeping invariants the test checks what
matters to a model: every computed position of every sequence reads its own token's KV,
whether it came from a prefix hit, a fork or a copy-on-write.
"""
from collections import Counter

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, invariant, precondition, rule)

from kvmm_daemon.kv.block_hash import hash_full_blocks
from kvmm_daemon.kv.block_pool import BlockPool
from kvmm_daemon.kv.kv_manager import KVCacheManager

BS = 4
NUM_BLOCKS = 12
MODEL = "stateful"
PREFIXES = [(), (1, 2, 3, 4), (1, 2, 3, 4, 5, 6, 7, 8), (1, 2, 3, 4, 9, 9, 9, 9),
            (5, 5, 5, 5, 5, 5, 5, 5, 5)]
tokens_st = st.lists(st.integers(0, 3), max_size=6)


class KVMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.pool = BlockPool(NUM_BLOCKS, on_evict=self._on_evict)
        self.mgr = KVCacheManager(self.pool, BS, MODEL)
        self.tokens: dict[int, list[int]] = {}   # model of each live sequence's tokens
        self.arena: dict[int, int] = {}          # shadow KV: slot -> token written there
        self.next_id = 0
        self.evictions = 0

    def _on_evict(self, block, block_hash):
        assert block.ref_cnt == 0 and block.block_hash == block_hash
        assert self.pool.get_cached_block(block_hash) is block
        self.evictions += 1
        event("eviction")

    def _new_id(self):
        self.next_id += 1
        return self.next_id

    def _uncommitted(self):
        done = self.mgr.num_computed_tokens
        return sorted(s for s, t in self.tokens.items() if done(s) < len(t))

    def _committed(self):
        done = self.mgr.num_computed_tokens
        return sorted(s for s, t in self.tokens.items() if done(s) == len(t))

    # --- rules ---------------------------------------------------------------------------

    @rule(prefix=st.sampled_from(PREFIXES), suffix=tokens_st)
    def allocate(self, prefix, suffix):
        prompt = list(prefix) + suffix or [0]
        sid = self._new_id()
        sure = self.mgr.can_allocate(len(prompt))
        before = self.mgr.statistics()
        res = self.mgr.allocate(sid, prompt)
        if res is None:
            assert not sure, "can_allocate promised room"
            event("allocate refused")
            assert self.mgr.statistics() == before
            return
        self.tokens[sid] = prompt
        if res.num_cached_tokens:
            event("prefix hit")
        assert res.num_cached_tokens % BS == 0 and res.num_cached_tokens < len(prompt)
        assert list(res.block_table) == self.mgr.block_table(sid)
        for p in range(res.num_cached_tokens):             # a hit serves the right KV
            assert self.arena[self.mgr.slot(sid, p)] == prompt[p]

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), new=tokens_st.filter(bool))
    def append(self, data, new):
        sid = data.draw(st.sampled_from(sorted(self.tokens)))
        can = self.mgr.can_append(sid, len(new))
        before = (self.mgr.statistics(), self.mgr.block_table(sid))
        slots = self.mgr.append_slots(sid, new)
        assert (slots is not None) == can
        if slots is None:
            assert (self.mgr.statistics(), self.mgr.block_table(sid)) == before
            event("append refused")
            return
        n0 = len(self.tokens[sid])
        assert slots == self.mgr.slot_mapping(sid, n0, n0 + len(new))
        self.tokens[sid].extend(new)

    @precondition(lambda self: self._uncommitted())
    @rule(data=st.data())
    def run(self, data):
        """What the model runner does: apply pending copies, write KV, commit."""
        sid = data.draw(st.sampled_from(self._uncommitted()))
        done = self.mgr.num_computed_tokens(sid)
        left = len(self.tokens[sid]) - done
        n = data.draw(st.one_of(st.just(left), st.integers(1, left)))   # often all of it
        copies = self.mgr.take_pending_copies()
        if copies:
            event("copy-on-write")
        for src, dst in copies:
            for i in range(BS):
                if src * BS + i in self.arena:
                    self.arena[dst * BS + i] = self.arena[src * BS + i]
                else:
                    self.arena.pop(dst * BS + i, None)
        pins = self.mgr.pinned_blocks()
        assert pins == {}
        for p in range(done, done + n):
            slot = self.mgr.slot(sid, p)
            # never write into a block another table can read
            assert self.pool.blocks[slot // BS].ref_cnt == 1
            self.arena[slot] = self.tokens[sid][p]
        self.mgr.commit(sid, n)
        for s, toks in self.tokens.items():                # every computed KV is right
            for p in range(self.mgr.num_computed_tokens(s)):
                assert self.arena[self.mgr.slot(s, p)] == toks[p], (s, p)

    @precondition(lambda self: self._committed())
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(self._committed()))
        child = self._new_id()
        self.mgr.fork(parent, child)
        self.tokens[child] = list(self.tokens[parent])
        assert self.mgr.block_table(child) == self.mgr.block_table(parent)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):
        sid = data.draw(st.sampled_from(sorted(self.tokens)))
        self.mgr.free(sid)
        del self.tokens[sid]
        assert sid not in self.mgr

    # --- invariants ----------------------------------------------------------------------

    @invariant()
    def bookkeeping(self):
        pool, mgr = self.pool, self.mgr
        table_refs = Counter()
        for sid, toks in self.tokens.items():
            table = mgr.block_table(sid)
            assert len(table) == -(-len(toks) // BS) and len(set(table)) == len(table)
            assert mgr.num_tokens(sid) == len(toks)
            done = mgr.num_computed_tokens(sid)
            hashes = mgr.block_hashes(sid)
            assert hashes == hash_full_blocks(toks[:done], BS, MODEL)
            for block_id, h in zip(table, hashes):         # a hashed block holds this prefix
                assert pool.blocks[block_id].block_hash in (None, h)
            table_refs.update(table)
        pins = mgr.pinned_blocks()
        order = pool.free_queue_order()
        queued = set(order)
        assert len(queued) == len(order) == pool.num_free_blocks
        for b in pool.blocks:
            assert b.ref_cnt == table_refs[b.block_id] + pins.get(b.block_id, 0)
            assert (b.ref_cnt == 0) == (b.block_id in queued) == b.is_queued
        hashed = [pool.blocks[i].block_hash is not None for i in order]
        assert hashed == sorted(hashed), "a cached block precedes a free one in the queue"
        cached = pool.cached_items()
        assert all(b.block_hash == h for h, b in cached)
        assert {b.block_id for _, b in cached} == {
            b.block_id for b in pool.blocks if b.block_hash is not None}
        s = mgr.statistics()
        p = s.pool
        assert p.blocks_total == NUM_BLOCKS
        assert p.blocks_allocated + p.blocks_cached + p.blocks_free == NUM_BLOCKS
        assert p.blocks_allocated == sum(b.ref_cnt > 0 for b in pool.blocks)
        assert p.blocks_cached == sum(b.is_cached for b in pool.blocks)
        assert p.evictions == self.evictions and p.evict_hook_errors == 0
        assert 0 <= p.prefix_hits <= p.prefix_queries
        assert s.num_seqs == len(self.tokens)

    def teardown(self):
        for sid in list(self.tokens):
            self.mgr.free(sid)
        self.tokens.clear()
        self.bookkeeping()
        assert self.mgr.statistics().pool.blocks_allocated == 0
        assert self.mgr.statistics().pending_copies == 0
        assert self.mgr.take_pending_copies() == []


KVMachine.TestCase.settings = settings(
    max_examples=1000, stateful_step_count=60, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestKVManagerStateful = KVMachine.TestCase
