"""Frozen snapshots of the engine's state, served by `kvmm stats` and the daemon."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True, slots=True)
class SessionInfo:
    session_id: str
    owner: object
    num_tokens: int
    kv_resident: bool        # holds parked KV blocks in memory
    busy: bool
    last_used: float


@dataclass(frozen=True, slots=True)
class EngineStats:
    kv: dict                 # blocks_total, blocks_allocated, blocks_cached, blocks_free, ...
    requests: dict           # running, waiting, preemptions
    sessions: tuple[SessionInfo, ...]
    steps: int
    tokens_computed: int     # every token a forward pass processed (prompt tokens + decode steps)
    block_size: int
    block_bytes: int
    weights: dict
    flash: dict | None = None   # FlashTier statistics when a swap tier is configured
    memory: dict | None = None  # bytes held: weights, weight_buffers, kv (as_dict adds rss, rest)
    tokens_decoded: int = 0     # tokens sampled (one per sequence per step that reached its end)

    @classmethod
    def collect(cls, engine) -> EngineStats:
        pool = asdict(engine.kv.pool.statistics())
        pool["locked"] = engine.runner.kv_cache.locked      # pinned in RAM (mlock)
        sched = engine.scheduler.statistics()
        sessions = tuple(SessionInfo(s.session_id, s.owner, len(s.token_ids), s.seq_id is not None,
                                     s.busy, s.last_used) for s in engine.sessions.values())
        weights = engine.runner.model.weights.statistics()
        return cls(kv=pool,
                   requests={"running": sched.running, "waiting": sched.waiting,
                             "running_seqs": sched.running_seqs, "preemptions": sched.preemptions},
                   sessions=sessions, steps=engine._steps, tokens_computed=engine._tokens_computed,
                   block_size=engine.kv.block_size, block_bytes=engine.runner.kv_cache.block_bytes,
                   weights=asdict(weights),
                   flash=engine.tier.statistics() if engine.tier is not None else None,
                   memory=memory_held(weights, engine.runner.kv_cache.nbytes),
                   tokens_decoded=engine._tokens_decoded)

    def as_dict(self) -> dict:
        d = asdict(self)
        if self.memory is not None:
            d["memory"] = memory_split(self.memory)
        d["sessions"] = [dict(asdict(s), owner=s.owner if isinstance(s.owner, (int, str, type(None))) else str(s.owner))
                         for s in self.sessions]
        return d


def memory_held(weights, kv_bytes: int) -> dict:
    """Bytes the pools hold: pinned weights, weight streaming buffers (window slots, embedding
    scratch, final norm) and the KV arena."""
    pinned = weights.pinned_bytes if weights.streaming else weights.resident_bytes
    buffers = weights.resident_bytes - pinned if weights.streaming else 0
    return {"weights": pinned, "weight_buffers": buffers, "kv": kv_bytes}


def memory_split(held: dict) -> dict:
    """`held` plus the process's rss and the rest of it (torch, Python, the tokenizer...),
    read now (not on every step: it is a /proc read)."""
    import psutil

    rss = psutil.Process().memory_info().rss
    return {"rss": rss, **held, "rest": rss - sum(held.values())}


def step_trace(engine) -> dict:
    """The `steps` reply: the weight pool's per-step, per-segment compute and stall times
    (model/step_trace.py; kept only when weights stream, i.e. --weight-budget below the
    model), the segment names in step order, and the files whose block I/O `kvmm trace`
    attributes (the prepared weight file, the swap tier's slot file)."""
    weights = engine.runner.model.weights
    trace = getattr(weights, "trace", None)
    wf = getattr(weights, "wf", None)
    files = {"weights": str(wf.path) if wf is not None else None,
             "swap": engine.tier.swap.slot_file if engine.tier is not None else None}
    if trace is None:
        return {"available": False, "reason": "weights are all resident (no --weight-budget below the "
                                              "model size): no per-layer I/O to trace",
                "steps_total": engine._steps, "segments": [], "steps": [], "files": files}
    return {"available": True, "reason": None, "steps_total": engine._steps,
            "segments": [r.name for r in wf.segments],
            "steps": [r.as_dict() for r in trace.snapshot()], "files": files}
