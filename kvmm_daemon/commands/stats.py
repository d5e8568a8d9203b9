"""`kvmm stats`: the daemon's KV pool, requests, clients and counters."""
from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    p = subparsers.add_parser("stats", help="show the daemon's statistics")
    p.add_argument("--socket", metavar="PATH", help="daemon socket (default $KVMM_SOCKET or /run/kvmm/kvmm.sock)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def format_stats(s: dict) -> str:
    kv, req, srv = s.get("kv", {}), s.get("requests", {}), s.get("server", {})
    lines = [
        f"kv blocks      total {kv.get('blocks_total')}  allocated {kv.get('blocks_allocated')}  "
        f"cached {kv.get('blocks_cached')}  free {kv.get('blocks_free')}",
        f"requests       running {req.get('running')}  waiting {req.get('waiting')}  "
        f"preemptions {req.get('preemptions', 0)}  served {srv.get('requests_total', 0)}",
        f"clients        connected {s.get('clients', {}).get('connected')}",
        f"sessions       {len(s.get('sessions', []))}",
        f"engine         steps {s.get('steps')}  tokens computed {s.get('tokens_computed')}",
        f"openmp         {(s.get('openmp') or {}).get('reason', 'unknown')}",
        f"uptime         {srv.get('uptime_s', 0):.0f} s{'  (draining)' if srv.get('draining') else ''}",
    ]
    view = srv.get("view")
    if view and view.get("state") != "off":
        lines.append(f"swapfs view    {view['state']} at {view['mountpoint']}"
                     + (f"  (DEGRADED: {view['reason']})" if view.get("reason") else ""))
    if srv.get("errors"):
        lines.append("errors         " + "  ".join(f"{k} {v}" for k, v in sorted(srv["errors"].items())))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from kvmm_daemon.client import Client

    with Client(args.socket) as client:
        stats = client.stats()
    print(json.dumps(stats) if args.json else format_stats(stats))
    return 0
