"""Metrics: the daemon's Prometheus metrics (served as GET /metrics by the HTTP API).

Two kinds. Per-request events (outcome, tokens in/out, TTFT, inter-token latency, prefix-cache
hit tokens) are counted as they happen by `Server.admit`/`Generation`, for every front alike
(msgpack and HTTP). Engine state (KV blocks by state, running/waiting requests, preemptions,
flash traffic, weight-pool stalls) is read from the engine's frozen statistics snapshot at
scrape time by a custom collector, so nothing is copied on the hot path.

Names follow vLLM's where an equivalent exists, with the `kvmm:` prefix in place of `vllm:`
(`kvmm:time_to_first_token_seconds`, `kvmm:num_requests_running`, ...), so dashboards need
only the prefix changed. Left out: per-tenant labels (a uid per series would let any scraper
enumerate tenants; the limits are in `kvmm stats`), and swap-out bytes of preempted sequences
(the flash tier counts only prefix blocks it writes; `kvmm:swap_out_bytes_total` is those).
"""
from __future__ import annotations

from typing import Any, Callable

from prometheus_client import (CollectorRegistry, Counter, Histogram, disable_created_metrics,
                               generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
               0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


class Metrics:
    """The registry of one daemon and the per-request instruments in it.

    Attributes: registry (everything /metrics shows); the instruments below are only ever
    incremented; `_snapshot` returns the engine's current EngineStats as a dict.
    """

    def __init__(self, snapshot: Callable[[], dict[str, Any]]):
        disable_created_metrics()          # no *_created series (process-wide, as vLLM does)
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.finished = Counter("kvmm:request_success", "Requests that ran to an end, by finish reason "
                                "(stop, length, abort)", ["finished_reason"], registry=r)
        self.refused = Counter("kvmm:request_failure", "Requests refused or failed, by error code "
                               "(invalid_request, limit_exceeded, capacity, shutting_down, engine_error...)",
                               ["code"], registry=r)
        self.prompt_tokens = Counter("kvmm:prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("kvmm:generation_tokens", "Completion tokens generated", registry=r)
        self.prefix_hit_tokens = Counter("kvmm:prefix_cache_hits", "Prompt tokens whose KV came from the "
                                         "prefix cache or a session (not recomputed)", registry=r)
        self.prefix_query_tokens = Counter("kvmm:prefix_cache_queries", "Prompt tokens looked up in the "
                                           "prefix cache", registry=r)
        self.ttft = Histogram("kvmm:time_to_first_token_seconds", "From admission to the first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("kvmm:inter_token_latency_seconds", "Between consecutive output tokens",
                             buckets=ITL_BUCKETS, registry=r)
        r.register(_EngineCollector(snapshot))

    def observe_tokens(self, first: bool, seconds: float, ntokens: int) -> None:
        """An output brought `ntokens` new tokens per choice, `seconds` after admission (the
        first) or after the previous output."""
        if ntokens <= 0:
            return
        if first:
            self.ttft.observe(seconds)
        else:
            self.itl.observe(seconds / ntokens)

    def observe_end(self, reasons: list[str | None], prompt_tokens: int, cached_tokens: int,
                    completion_tokens: int) -> None:
        for reason in reasons:
            self.finished.labels(reason or "abort").inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.prefix_query_tokens.inc(prompt_tokens)
        self.prefix_hit_tokens.inc(cached_tokens)
        self.generation_tokens.inc(completion_tokens)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """Engine state read from its statistics snapshot at scrape time."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]):
        self._snapshot = snapshot

    def collect(self):
        s = self._snapshot()
        kv, req, weights, flash = s["kv"], s["requests"], s["weights"], s.get("flash") or {}
        blocks = GaugeMetricFamily("kvmm:kv_blocks", "KV blocks by state", labels=["state"])
        for state in ("free", "allocated", "cached"):
            blocks.add_metric([state], kv[f"blocks_{state}"])
        yield blocks
        total = kv["blocks_total"] or 1
        yield GaugeMetricFamily("kvmm:kv_cache_usage_perc", "Fraction of KV blocks allocated (0..1)",
                                value=kv["blocks_allocated"] / total)
        yield GaugeMetricFamily("kvmm:num_requests_running", "Requests in the running batch",
                                value=req["running"])
        yield GaugeMetricFamily("kvmm:num_requests_waiting", "Requests waiting for admission",
                                value=req["waiting"])
        pre = CounterMetricFamily("kvmm:num_preemptions", "Preemptions by kind (swap: KV to flash; "
                                  "recompute: KV dropped)", labels=["kind"])
        if flash:
            pre.add_metric(["swap"], flash["swap_preemptions"])
            pre.add_metric(["recompute"], flash["recompute_preemptions"])
        else:
            pre.add_metric(["recompute"], req["preemptions"])
        yield pre
        per_token = s["block_bytes"] / max(1, s["block_size"])
        from_flash = (flash.get("swapped_in_tokens", 0) + flash.get("prefix_tokens_from_flash", 0)
                      + flash.get("session_tokens_from_flash", 0))
        yield CounterMetricFamily("kvmm:swap_in_bytes", "KV bytes read back from the flash tier",
                                  value=from_flash * per_token)
        yield CounterMetricFamily("kvmm:swap_out_bytes", "KV bytes of prefix blocks written to the "
                                  "flash tier", value=flash.get("prefix_blocks_written", 0) * s["block_bytes"])
        yield CounterMetricFamily("kvmm:weight_stall_seconds", "Time the forward waited for weight "
                                  "chunks from flash", value=weights.get("stall_s") or 0.0)
        yield CounterMetricFamily("kvmm:weight_read_bytes", "Weight bytes streamed from flash",
                                  value=weights.get("bytes_read") or 0)
        yield CounterMetricFamily("kvmm:engine_steps", "Engine steps run", value=s["steps"])
