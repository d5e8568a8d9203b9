"""Scheduler: continuous batching under a per-step token budget, FCFS, preemption.

Each step it (1) gives every running request's sequences their next tokens — one for a
decode, a chunk for a prefill that did not finish (chunked prefill) — reserving KV slots as
it goes, and (2) admits waiting requests in arrival order while the token budget, the
sequence limit and the KV pool allow. Prefill and decode share the step.

When the pool is short it first releases parked session KV (oldest first: full blocks stay
in the prefix cache, so a session loses little), then preempts the newest running request:
its blocks are freed and it returns to the front of the queue to be recomputed (its full
blocks usually survive as cached prefix blocks). A `preempt_hook` lets the swap tier offer a
cheaper alternative (write the blocks out instead) — the scheduler only calls it.

Mechanism stays in the KV manager: it answers and acts, returning None when short; every
decision about whom to stop is made here.

Failure containment: anything one request's data makes go wrong while it is admitted or given
its slots (a token id the hash rejects, a flash restore that raises) takes that request out
of the queues, frees its blocks and reports it in `SchedulerOutput.failed`; the other
requests are scheduled as if it had never been there.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from kvmm_daemon.engine.sequence import Request, RequestStatus, Sequence
from kvmm_daemon.kv.kv_manager import KVCacheManager


@dataclass(slots=True)
class ScheduledSeq:
    request: Request
    seq: Sequence
    start: int          # first position computed this step
    num_tokens: int

    @property
    def reaches_end(self) -> bool:
        return self.start + self.num_tokens == self.seq.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    failed: list[tuple[Request, Exception]] = field(default_factory=list)   # removed, blocks freed

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    running: int
    waiting: int
    running_seqs: int
    preemptions: int


class Scheduler:
    """Attributes and invariants:
        waiting: requests holding no KV blocks, in arrival order (preempted ones re-enter
            at their arrival position, so FCFS holds).
        running: requests whose every live sequence holds blocks in `kv`, in arrival order.
        release_idle: callable freeing one parked session's blocks; False when none is left.
    """

    def __init__(self, kv: KVCacheManager, *, max_num_seqs: int, max_num_batched_tokens: int,
                 release_idle: Callable[[], bool] = lambda: False, tier=None) -> None:
        self.kv = kv
        self.tier = tier          # FlashTier or None: swap instead of drop, restore on admission
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.release_idle = release_idle
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        assert req.status is RequestStatus.WAITING
        self.waiting.append(req)

    def remove(self, req: Request) -> None:
        """Take a request out of the queues (finished or aborted) and free every block its
        live sequences hold (a waiting request may hold adopted session KV)."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        for seq in req.seqs:
            if seq.seq_id in self.kv:
                self.kv.free(seq.seq_id)
            elif self.tier is not None:
                self.tier.drop(seq)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # --- one step -----------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if len(req.seqs) > budget:
                break
            try:
                kept = self._schedule_running(req, budget, out)
            except Exception as exc:       # this request's data broke it: fail it alone
                self._fail(req, exc, out)
                continue
            if kept:
                budget -= sum(s.num_tokens for s in out.scheduled if s.request is req)
                i += 1
            # else: req itself was preempted and removed from running; i stays
        while self.waiting and budget > 0 and not out.preempted:
            req = self.waiting[0]
            if self._num_running_seqs() + len(req.seqs) > self.max_num_seqs or len(req.seqs) > budget:
                break
            try:
                admitted = self._admit(req)
            except Exception as exc:
                self._fail(req, exc, out)
                continue
            if not admitted:
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            budget -= self._schedule_seqs(req, budget, out)
        return out

    def _schedule_running(self, req: Request, budget: int, out: SchedulerOutput) -> bool:
        """Reserve slots for req's next tokens, preempting newer requests if needed.
        Returns False if req itself had to be preempted."""
        share = max(1, budget // len(req.seqs))
        for seq in req.seqs:
            end = seq.num_computed_tokens + min(seq.num_uncomputed, share)
            while not self._reserve(seq, end):
                if self.release_idle():
                    continue
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is req:
                    return False
        self._schedule_seqs(req, budget, out)
        return True

    def _schedule_seqs(self, req: Request, budget: int, out: SchedulerOutput) -> int:
        share = max(1, budget // len(req.seqs))
        used = 0
        for seq in req.seqs:
            n = min(seq.num_uncomputed, share, self.kv.num_tokens(seq.seq_id) - seq.num_computed_tokens)
            if n > 0:
                out.scheduled.append(ScheduledSeq(req, seq, seq.num_computed_tokens, n))
                used += n
        return used

    def _reserve(self, seq: Sequence, end: int) -> bool:
        have = self.kv.num_tokens(seq.seq_id)
        if have >= end:
            return True
        return self.kv.append_slots(seq.seq_id, seq.token_ids[have:end]) is not None

    def _admit(self, req: Request) -> bool:
        """Give every sequence of a waiting request its blocks (all or none)."""
        allocated: list[Sequence] = []
        for seq in req.seqs:
            if seq.seq_id in self.kv:          # adopted session KV: already holds its blocks
                continue
            while (res := self.kv.allocate(seq.seq_id, seq.token_ids, req.cache_root)) is None:
                if not self.release_idle():
                    for s in allocated:
                        self.kv.free(s.seq_id)
                        s.num_computed_tokens = 0
                    return False
            seq.num_computed_tokens = res.num_cached_tokens
            if self.tier is not None:
                seq.num_computed_tokens += self.tier.restore(seq, req.session_id)
            allocated.append(seq)
        if req.num_cached_prompt_tokens < 0:
            req.num_cached_prompt_tokens = min(req.seqs[0].num_computed_tokens, req.num_prompt_tokens)
        return True

    def _fail(self, req: Request, exc: Exception, out: SchedulerOutput) -> None:
        """Take a request whose scheduling raised out of the queues with its blocks freed."""
        out.scheduled = [s for s in out.scheduled if s.request is not req]
        try:
            self.remove(req)
        except Exception:          # its bookkeeping is what broke: free what can be freed
            self.running = [r for r in self.running if r is not req]
            self.waiting = deque(r for r in self.waiting if r is not req)
            for seq in req.seqs:
                if seq.seq_id in self.kv:
                    self.kv.free(seq.seq_id)
        out.failed.append((req, exc))

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        """Free every block (after writing them to flash when the tier finds swapping cheaper
        than recomputing) and put the request back in the queue at its arrival position."""
        self.running.remove(req)
        out.scheduled = [s for s in out.scheduled if s.request is not req]
        for seq in req.seqs:
            if self.tier is not None:
                self.tier.swap_out(seq)
            self.kv.free(seq.seq_id)
            seq.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        pos = 0
        while pos < len(self.waiting) and self.waiting[pos].arrival_time <= req.arrival_time:
            pos += 1
        self.waiting.insert(pos, req)
        out.preempted.append(req)

    def _num_running_seqs(self) -> int:
        return sum(len(r.seqs) for r in self.running)

    def statistics(self) -> SchedulerStats:
        return SchedulerStats(running=len(self.running), waiting=len(self.waiting),
                              running_seqs=self._num_running_seqs(), preemptions=self.num_preemptions)
