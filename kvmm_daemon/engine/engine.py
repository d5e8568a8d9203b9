"""Engine: one model, one KV pool, many requests; stepped by its owner.

`step()` runs one scheduler iteration: apply queued commands (add, abort, session ops),
schedule, run the model on the batch, sample, stream deltas, finish requests. It is
blocking compute; the daemon calls it from a worker thread while its event loop keeps
serving, so the public mutators only queue commands under a lock (thread-safe) and
`statistics()` returns the snapshot taken at the end of the last step.

Sessions keep KV between turns: when a session's turn finishes, its sequence is *parked*
(its blocks stay allocated, the history is remembered). The next turn's prompt tokens are
appended to the history and the parked sequence is adopted, so only the new tokens are
computed. Under memory pressure parked sessions are released oldest-first (their full
blocks stay in the prefix cache, so a later turn usually still hits them).
"""
from __future__ import annotations

import logging
import os
import threading
import time

import torch

from kvmm_daemon.engine_config import EngineConfig
from kvmm_daemon.engine import choices
from kvmm_daemon.engine.engine_stats import EngineStats, SessionInfo, step_trace
from kvmm_daemon.engine.flash_tier import FlashTier
from kvmm_daemon.engine.model_runner import ModelRunner, ScheduledChunk
from kvmm_daemon.engine.outputs import GenerateResult, OutputAccumulator, RequestOutput
from kvmm_daemon.engine.request_outputs import error_output, request_output
from kvmm_daemon.engine.prompts import PromptEncoder
from kvmm_daemon.engine.sampling_params import SamplingParams
from kvmm_daemon.engine.scheduler import Scheduler
from kvmm_daemon.engine.sequence import Request, RequestStatus, Sequence, next_seq_id
from kvmm_daemon.engine.session_evictor import pick_victim
from kvmm_daemon.engine.session_table import SessionTable
from kvmm_daemon.engine.stop_checker import StopChecker
from kvmm_daemon.errors import CapacityError, RequestError
from kvmm_daemon.kv.kv_manager import KVCacheManager
from kvmm_daemon.kv.tenant import PREFIX_HASH_SCHEME, tenant_root

log = logging.getLogger("kvmm.engine")


class Engine:
    def __init__(self, cfg: EngineConfig, model_file, runner: ModelRunner, kv: KVCacheManager,
                 swap=None, io=None) -> None:
        self.cfg = cfg
        self.io = io                     # the iosched.IOScheduler weights and swapfs share (owned)
        self.model_file = model_file
        self.spec = model_file.spec
        self.tokenizer = model_file.tokenizer
        self.chat_template = model_file.chat_template
        self.runner = runner
        self.kv = kv
        self.tier = FlashTier(swap, runner.kv_cache, kv, preemption=cfg.preemption) if swap is not None else None
        self.scheduler = Scheduler(kv, max_num_seqs=cfg.max_num_seqs,
                                   max_num_batched_tokens=cfg.max_num_batched_tokens,
                                   release_idle=lambda: self.sessions.release_oldest(), tier=self.tier)
        self.stop_checker = StopChecker(self.tokenizer, cfg.max_model_len)
        self.prompts = PromptEncoder(self.tokenizer, self.chat_template, self.spec.vocab_size,
                                     self.stop_checker.eos_ids)
        self.requests: dict[str, Request] = {}
        self.sessions = SessionTable(kv, self.tier)
        self._lock = threading.Lock()
        self._inbox: list[tuple] = []
        self._steps = 0
        self._tokens_computed = 0
        self._tokens_decoded = 0
        self._full_seen = 0          # the flash tier's "full" errors already answered by eviction
        if self.tier is not None:
            dropped = swap.adopt_prefix_scheme(PREFIX_HASH_SCHEME)
            if dropped:
                log.warning("flash tier: discarded %d prefix blocks stored under an older hash scheme "
                            "(not salted per tenant, so nobody may read them); they are recomputed "
                            "on demand", dropped)
        self.sessions.load_stored()         # sessions committed to flash survive restarts
        self._snapshot: EngineStats = self._take_snapshot()

    @classmethod
    def from_config(cls, cfg: EngineConfig) -> Engine:
        from kvmm_daemon.engine.loader import build_engine_parts, open_io_scheduler, open_swap
        io = open_io_scheduler(cfg) if cfg.weight_budget is not None or cfg.swap_dir else None
        try:
            model_file, runner, kv = build_engine_parts(cfg, io)
            swap = open_swap(cfg, model_file.spec, runner.kv_cache, io) if cfg.swap_dir else None
        except BaseException:
            if io is not None:
                io.close()
            raise
        return cls(cfg, model_file, runner, kv, swap, io)

    def close(self) -> None:
        """Release the flash tier (flushes staged prefix blocks, closes the store), the weight
        pool (its file) and then the I/O scheduler both used. Idempotent."""
        self.runner.model.weights.close()
        if self.tier is not None:
            self.tier.close()
            self.tier = self.scheduler.tier = self.sessions.tier = None
        if self.io is not None:
            self.io.close()
            self.io = None

    # --- thread-safe API ------------------------------------------------------------------

    def encode_prompt(self, *, text: str | None = None, messages: list | None = None,
                      token_ids: list[int] | None = None, raw: bool = False,
                      add_generation_prompt: bool = True, session_id: str | None = None) -> list[int]:
        """Prompt token ids (see prompts.encode_prompt); a session with history gets only
        its new turn rendered."""
        session = self.sessions.get(session_id) if session_id is not None else None
        return self.prompts.encode(text=text, messages=messages, token_ids=token_ids, raw=raw,
                                   add_generation_prompt=add_generation_prompt,
                                   history=session.token_ids if session is not None else None)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    *, session_id: str | None = None, owner: object = None) -> None:
        if not prompt_token_ids:
            raise RequestError("the prompt is empty; give at least one token")
        self._check_fits(len(prompt_token_ids), params, session_id)
        with self._lock:
            if request_id in self.requests or any(c[0] == "add" and c[1] == request_id for c in self._inbox):
                raise RequestError(f"request id {request_id!r} is already in use")
            self._inbox.append(("add", request_id, list(prompt_token_ids), params, session_id, owner))

    def abort_request(self, request_id: str) -> None:
        with self._lock:
            self._inbox.append(("abort", request_id))

    def open_session(self, session_id: str, owner: object = None) -> None:
        with self._lock:
            self._inbox.append(("open", session_id, owner))

    def delete_session(self, session_id: str) -> None:
        with self._lock:
            self._inbox.append(("delete", session_id))

    def session_imported(self, session_id: str) -> None:
        """A session was committed to flash behind the engine's back (an import through the
        view): list it from the next step on."""
        with self._lock:
            self._inbox.append(("imported", session_id))

    def list_sessions(self) -> list[SessionInfo]:
        return list(self._snapshot.sessions)

    def has_unfinished_requests(self) -> bool:
        with self._lock:
            return bool(self._inbox) or self.scheduler.has_work() or \
                (self.tier is not None and self.tier.has_pending())

    def statistics(self) -> EngineStats:
        return self._snapshot

    def step_trace(self) -> dict:
        """Per-step, per-segment compute and stall times of the weight pool (any thread)."""
        return step_trace(self)

    # --- admission checks -----------------------------------------------------------------

    def _check_fits(self, prompt_len: int, params: SamplingParams, session_id: str | None) -> None:
        history = 0
        if session_id is not None:
            if params.num_choices > 1:
                raise RequestError("a session turn returns one choice; use n=1 and beam_width=1 with --session")
            s = self.sessions.get(session_id)
            history = len(s.token_ids) if s else 0
        total = history + prompt_len
        limit = self.cfg.max_model_len
        if total >= limit:
            what = f"session history ({history}) + prompt ({prompt_len})" if history else f"prompt ({prompt_len} tokens)"
            raise RequestError(f"{what} does not fit the context of {limit} tokens (max_model_len); "
                               "shorten the prompt, start a new session, or raise --max-model-len")
        bs = self.kv.block_size
        out_len = min(params.max_tokens, limit - total)
        need = -(-total // bs) + params.num_choices * (-(-out_len // bs) + 1)
        have = self.kv.pool.num_blocks
        if need > have:
            raise CapacityError(
                f"this request needs up to {need} KV blocks ({params.num_choices} choice(s) of {total} + "
                f"{out_len} tokens) but the pool has {have}; raise --kv-budget or lower max_tokens/n/beam_width")

    # --- the step --------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One iteration. Whatever one request's data makes go wrong (scheduling, hashing,
        the model step, sampling) fails that request alone: it ends with an error, its blocks
        are freed, and every other request of the batch goes on."""
        outputs: dict[str, RequestOutput] = {}
        self._apply_inbox(outputs)
        sched = self.scheduler.schedule()
        for req, exc in sched.failed:
            self._fail(req, "scheduling", exc, outputs)
        scheduled = sched.scheduled
        if scheduled:
            t0 = time.perf_counter()
            scheduled, logits = self._execute(scheduled, self.kv.take_pending_copies(), outputs)
            if self.tier is not None and scheduled:
                self.tier.record_prefill(sum(s.num_tokens for s in scheduled) - len(scheduled),
                                         time.perf_counter() - t0)
            if scheduled:
                self._steps += 1
            row = 0
            by_req: dict[str, tuple[Request, list[int]]] = {}
            for s in scheduled:
                self._tokens_computed += s.num_tokens
                if s.reaches_end:
                    by_req.setdefault(s.request.request_id, (s.request, []))[1].append(row)
                    row += 1
            self._tokens_decoded += row
            committed = self._commit(scheduled, outputs)
            for rid, (req, rows) in by_req.items():
                if rid not in committed:
                    continue
                try:
                    self._advance(req, logits[rows])
                    outputs[rid] = request_output(req)
                except Exception as exc:
                    self._fail(req, "sampling", exc, outputs)
        if self.tier is not None:
            # submit this step's evicted prefix blocks, then commit the deferred flash writes
            # of earlier steps that are done (all, waiting, when nothing was computed: there
            # is no compute to overlap them with)
            self.tier.flush()
            self.tier.complete(block=not sched.scheduled)
            self.sessions.offload_idle(self.cfg.session_idle_s)
            self._evict_if_full(outputs)
        self._snapshot = self._take_snapshot()
        return list(outputs.values())

    def _evict_if_full(self, outputs: dict) -> None:
        """After a session save found the swap area full: delete the oldest idle session of
        the uid most over its share (session_evictor.py), one per step."""
        full = self.tier.stats.errors.get("full", 0)
        if full == self._full_seen:
            return
        self._full_seen = full
        st = self.tier.swap.statistics()
        victim = pick_victim(self.sessions, self.tier.stored_sessions(), st.capacity_bytes,
                             st.block_bytes, self.cfg.swap_quota_per_uid)
        if victim is None:
            return
        log.warning("swap area full: deleting session %s of uid %s, the oldest idle one of the uid "
                    "most over its share (%d bytes over); raise --swap-size or lower "
                    "max_sessions_per_uid", victim.session_id, victim.owner, victim.over_share_bytes)
        self._cmd_delete(victim.session_id, outputs=outputs)

    def _execute(self, scheduled: list, copies: list, outputs: dict):
        """Run the model on the batch. When it raises, run each request alone to find the
        ones it fails for (rewriting the same KV slots is harmless) and fail only those.
        Returns the scheduled items that ran and their logits."""
        def chunks(items):
            return [ScheduledChunk(s.seq.token_ids, s.start, s.num_tokens,
                                   self.kv.block_table(s.seq.seq_id), s.reaches_end) for s in items]
        try:
            return scheduled, self.runner.execute(chunks(scheduled), copies)
        except Exception as exc:   # bad data of one request, a bug or a broken model
            groups: dict[str, list] = {}
            for s in scheduled:
                groups.setdefault(s.request.request_id, []).append(s)
            if len(groups) == 1:
                self._fail(scheduled[0].request, "the model step", exc, outputs)
                return [], None
            log.warning("model step of %d requests failed (%s: %s); running each alone to find "
                        "the culprit", len(groups), type(exc).__name__, exc)
        kept, parts = [], []
        for items in groups.values():
            try:
                part = self.runner.execute(chunks(items), copies)
            except Exception as exc:
                self._fail(items[0].request, "the model step", exc, outputs)
                continue
            kept += items
            parts.append(part)
        return kept, (torch.cat(parts) if parts else None)

    def _commit(self, scheduled: list, outputs: dict) -> set[str]:
        """Record the KV just written (hashing blocks that filled); ids of requests that
        committed (a request whose hashing raised is failed instead)."""
        ok: set[str] = set()
        failed: set[str] = set()
        for s in scheduled:
            rid = s.request.request_id
            if rid in failed:
                continue
            try:
                self.kv.commit(s.seq.seq_id, s.num_tokens)
                s.seq.num_computed_tokens += s.num_tokens
            except Exception as exc:
                failed.add(rid)
                ok.discard(rid)
                self._fail(s.request, "block hashing", exc, outputs)
                continue
            ok.add(rid)
        return ok

    def _fail(self, req: Request, stage: str, exc: Exception, outputs: dict) -> None:
        """End one request with an error naming the stage; its blocks are freed (the
        scheduler's `remove` is idempotent, so a request it already dropped is fine)."""
        log.warning("request %s (uid %s) failed in %s, the others go on: %s: %s",
                    req.request_id, req.owner, stage, type(exc).__name__, exc)
        req.error = (f"the engine failed while computing this request ({stage}: {exc}); "
                     "check its prompt or session")
        if req.request_id not in self.requests:
            return
        try:
            self._finish(req, reason="error")
            outputs[req.request_id] = request_output(req)
        except Exception:
            log.exception("cleaning up failed request %s", req.request_id)
            self.requests.pop(req.request_id, None)
            outputs[req.request_id] = error_output(req.request_id, len(req.prompt_token_ids), req.error)

    def settle_flash(self) -> None:
        """Commit every deferred flash write now (waiting for its I/O), then release idle
        sessions that are on flash."""
        if self.tier is not None:
            self.tier.complete(block=True)
            self.sessions.offload_idle(self.cfg.session_idle_s)
            self._snapshot = self._take_snapshot()

    def _advance(self, req: Request, logits) -> None:
        now = time.perf_counter()
        if not req.forked:
            req.prefill_done_time = now
            seed = req.params.seed if req.params.seed is not None else int.from_bytes(os.urandom(8), "little")
            updated = choices.expand(req, logits[0], self.kv, seed)
        elif req.params.beam_width > 1:
            updated = choices.beam_step(req, logits, self.kv, self.stop_checker.eos_ids)
        else:
            updated = choices.sample_step(req, logits)
        if req.first_token_time is None:
            req.first_token_time = now
        for seq in updated:
            self.stop_checker.update(seq, req.params)
        if req.params.beam_width > 1:
            if any(s.finish_reason == "length" for s in req.seqs) or choices.beams_done(req):
                for seq in req.seqs:
                    seq.finish_reason = seq.finish_reason or "length"
                    self.kv.free(seq.seq_id)
                req.finished.extend(req.seqs)
                req.seqs = []
        else:
            for seq in [s for s in req.seqs if s.finish_reason]:
                req.seqs.remove(seq)
                req.finished.append(seq)
                if not self.sessions.park(req.session_id, seq):
                    self.kv.free(seq.seq_id)
        if not req.seqs:
            self._finish(req)

    def _finish(self, req: Request, reason: str | None = None) -> None:
        req.finish_time = time.perf_counter()
        if reason is not None:
            for seq in req.seqs:
                seq.finish_reason = reason
            self.scheduler.remove(req)  # frees the live sequences' blocks
            req.finished.extend(req.seqs)
            req.seqs = []
            if req.session_id in self.sessions:
                self.sessions[req.session_id].busy = False
        else:
            self.scheduler.remove(req)  # no live sequences left: only leaves the queue
        req.status = RequestStatus.FINISHED
        if req.params.beam_width > 1:
            req.finished.sort(key=lambda s: -choices.beam_score(s))
            del req.finished[req.params.beam_width:]
            for i, seq in enumerate(req.finished):
                seq.choice_index = i
                reason = seq.finish_reason
                self.stop_checker.update(seq, req.params)   # text of the final hypotheses
                seq.finish_reason = reason or seq.finish_reason
        del self.requests[req.request_id]

    # --- commands --------------------------------------------------------------------------

    def _apply_inbox(self, outputs: dict[str, RequestOutput]) -> None:
        with self._lock:
            inbox, self._inbox = self._inbox, []
        for cmd in inbox:
            try:
                getattr(self, f"_cmd_{cmd[0]}")(*cmd[1:], outputs=outputs)
            except RequestError as exc:
                if cmd[0] == "add":
                    outputs[cmd[1]] = error_output(cmd[1], len(cmd[2]), str(exc))
            except Exception as exc:     # one command's data must not stop the others
                log.warning("engine command %s %r failed: %s: %s", cmd[0], cmd[1], type(exc).__name__, exc)
                if cmd[0] == "add":
                    req = self.requests.get(cmd[1])
                    if req is not None:
                        self._fail(req, "admission", exc, outputs)
                    else:
                        outputs[cmd[1]] = error_output(cmd[1], len(cmd[2]), f"the engine could not admit this request: {exc}")

    def _cmd_add(self, request_id, prompt, params, session_id, owner, *, outputs) -> None:
        self._check_fits(len(prompt), params, session_id)
        seq = Sequence(seq_id=next_seq_id(), token_ids=list(prompt), num_prompt_tokens=len(prompt))
        req = Request(request_id, list(prompt), params, [seq], session_id=session_id, owner=owner)
        tenant = owner
        if session_id is not None:
            s = self.sessions.get_or_create(session_id, owner)
            tenant = s.owner                  # a session's KV is its owner's, whoever sends the turn
            if s.busy:
                raise RequestError(f"session {session_id!r} already has a turn in flight; wait for it to finish")
            bad = next((t for t in s.token_ids if not 0 <= t < self.spec.vocab_size), None)
            if bad is not None:
                raise RequestError(f"session {session_id!r} holds token id {bad}, outside the model's "
                                   f"vocabulary; delete it (kvmm sessions rm)")
            s.busy = True
            s.last_used = time.monotonic()
            full = s.token_ids + list(prompt)
            seq.token_ids = full
            seq.num_prompt_tokens = len(full)
            req.prompt_token_ids = list(full)
            if s.seq_id is not None:          # adopt the parked KV
                seq.seq_id = s.seq_id
                seq.num_computed_tokens = self.kv.num_computed_tokens(s.seq_id)
                req.num_cached_prompt_tokens = seq.num_computed_tokens
            s.seq_id = None
        req.cache_root = tenant_root(tenant, shared=self.cfg.share_prefix_cache)
        self.requests[request_id] = req
        self.scheduler.add(req)

    def _cmd_abort(self, request_id, *, outputs) -> None:
        req = self.requests.get(request_id)
        if req is None:
            return
        self._finish(req, reason="abort")
        outputs[request_id] = request_output(req)

    def _cmd_imported(self, session_id, *, outputs) -> None:
        if self.tier is not None and self.tier.has_session(session_id):
            self.sessions.get_or_create(session_id, None)

    def _cmd_open(self, session_id, owner, *, outputs) -> None:
        self.sessions.get_or_create(session_id, owner)

    def _cmd_delete(self, session_id, *, outputs) -> None:
        s = self.sessions.get(session_id)
        if s is None:
            return
        for req in list(self.requests.values()):
            if req.session_id == session_id:
                self._finish(req, reason="abort")
                outputs[req.request_id] = request_output(req)
        self.sessions.delete(session_id)

    def _take_snapshot(self) -> EngineStats:
        return EngineStats.collect(self)

    # --- synchronous convenience -------------------------------------------------------------

    def generate(self, prompt_token_ids: list[int], params: SamplingParams, *,
                 session_id: str | None = None, request_id: str | None = None,
                 on_output=None) -> GenerateResult:
        """Run one request to completion on this thread (kvmm run); returns once the flash
        tier's deferred writes (this turn's write-through) are committed."""
        rid = request_id or f"run-{next_seq_id()}"
        self.add_request(rid, prompt_token_ids, params, session_id=session_id)
        acc = OutputAccumulator(params.num_choices)
        final: RequestOutput | None = None
        while final is None:
            for out in self.step():
                if out.request_id != rid:
                    continue
                if on_output is not None:
                    on_output(out)
                acc.take(out)
                if out.finished:
                    final = out
        self.settle_flash()       # a blocking call returns with its turn committed on flash
        if final.error:
            raise RequestError(final.error)
        result_choices = acc.choices()
        prompt = list(prompt_token_ids)
        return GenerateResult(rid, prompt, result_choices, final.usage, final.timings)
