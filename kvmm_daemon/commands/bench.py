"""`kvmm bench NAME`: benchmarks, each printing a short table and writing JSON (--json FILE).

Every benchmark runs its baseline in the same run, side by side. Each lives in a module with
`register_args(parser)` and `run_<name>_bench(args) -> dict`.
"""
from __future__ import annotations

import argparse
import importlib
import json
import platform
import time

BENCHES = {
    "kv": ("kvmm_daemon.bench.kv_bench", "KV block pool: slot utilization, concurrency vs contiguous, CoW savings"),
    "decode": ("kvmm_daemon.bench.decode_bench", "decode/prefill tokens/s on the model; paged vs contiguous attention"),
    "serve": ("kvmm_daemon.bench.serve_bench", "concurrent clients through the daemon vs in-process"),
    "swap": ("swapfs.bench", "swapfs swap-out/in bandwidth vs plain O_DIRECT"),
    "resume": ("kvmm_daemon.bench.resume_bench", "session resume from flash vs recompute"),
    "weights": ("kvmm_daemon.bench.weights_bench", "decode with weights streamed under a budget vs llama.cpp in a cgroup"),
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks (table + JSON)", description=__doc__)
    bsub = p.add_subparsers(dest="bench", metavar="NAME", required=True)
    for name, (module, help_text) in BENCHES.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        bp = bsub.add_parser(name, help=help_text, description=help_text)
        bp.add_argument("--json", metavar="FILE", help="write the figures as JSON to FILE")
        mod.register_args(bp)
        bp.set_defaults(func=run, bench_fn=getattr(mod, f"run_{name}_bench"))


def run(args: argparse.Namespace) -> int:
    import torch

    started = time.time()
    result = args.bench_fn(args)
    result.setdefault("bench", args.bench)
    result["machine"] = {"cpu_count": torch.get_num_threads(), "python": platform.python_version(),
                         "torch": torch.__version__, "started": started,
                         "seconds": round(time.time() - started, 2)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    return 0
