"""`kvmm bench weights`: decode speed when the weights do not fit, kvmm vs llama.cpp.

For each weight budget (default 100%, 50%, 25% of the model file and 22 MiB) and batch
(1 and 16), in the same run and each after a page-cache drop:

* kvmm (weights_run.py in a child) with `--weight-budget` = the budget, inside a memory cgroup
  of: a process that only imports torch + the weight budget + the KV budget + 64 MiB, so the
  budget is shown to hold without help from the page cache;
* llama.cpp (llama_cpp_limited.py: llama-cpp-python, mmap) inside a memory cgroup of its own
  anonymous memory (measured first, with the same n_ctx, unlimited) + the budget: the same
  bytes for weights, left to the page cache as llama.cpp does.

Reported per budget (and batch): decode tokens/s, kvmm ÷ llama.cpp, weight bytes read per
decoded token, the share of step time stalled on flash, the achieved read rate ÷ plain
O_DIRECT reads of the same file in segment-sized requests (direct_read.py, the flash limit),
and whether kvmm's greedy tokens equal those of the all-resident engine. The model's bytes
are the GGUF file's (what llama.cpp maps); the bytes of kvmm's weight file that a step would
read with nothing pinned (int4-packed layers, the LM head as Q8_0 blocks) are reported as
`kvmm_stream_bytes`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from kvmm_daemon.sizes import format_size, parse_size

MiB = 1 << 20
SLACK = 64 * MiB


def register_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--budgets", default="100%,50%,25%,22MiB",
                   help="weight budgets: percentages of the model file or sizes (default 100%%,50%%,25%%,22MiB)")
    p.add_argument("--batches", default="1,16", help="batch sizes (default 1,16)")
    p.add_argument("--tokens", type=int, default=24, help="decode steps measured per run (default 24)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kv-budget", default="16MiB")
    p.add_argument("--model", default=None, help="GGUF file (default: the embedded SmolLM2-135M; a 1B-shape "
                   "one: scripts/make_random_gguf.py)")
    p.add_argument("--state-dir", default="/var/tmp/kvmm-bench-state",
                   help="where kvmm keeps its weight file (on flash, not tmpfs)")
    p.add_argument("--no-llama-cpp", action="store_true", help="skip the llama.cpp baseline")
    p.add_argument("--llama-seconds", type=float, default=30.0, help="cap per llama.cpp run")


def _child(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def _json_of(run, what: str) -> dict:
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("{")]
    if run.returncode != 0 or not lines:
        tail = (run.stderr or "").strip().splitlines()[-3:]
        return {"error": f"{what} exited {run.returncode}" + (" (OOM-killed)" if getattr(run, "oom_killed", False)
                                                               else "") + (": " + " | ".join(tail) if tail else "")}
    return json.loads(lines[-1])


def _torch_rss() -> int:
    code = "import torch\nprint([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])"
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout) * 1024


def _budgets(spec: str, model_bytes: int) -> dict[str, int]:
    out = {}
    for label in (s.strip() for s in spec.split(",") if s.strip()):
        out[label] = (int(model_bytes * float(label[:-1]) / 100) if label.endswith("%")
                      else parse_size(label, what="--budgets"))
    return out


def run_weights_bench(args: argparse.Namespace) -> dict:
    from kvmm_daemon.model.model_file import default_model_path

    # A private copy of the model: the installed file is mapped by other processes (tests,
    # daemons), and a drop cannot evict mapped pages, so it would never start cold.
    private = Path(tempfile.mkdtemp(prefix="kvmm-bench-model-", dir="/var/tmp"))
    try:
        model = str(private / Path(args.model or default_model_path()).name)
        shutil.copyfile(args.model or default_model_path(), model)
        return _run(args, model)
    finally:
        shutil.rmtree(private, ignore_errors=True)


def _run(args: argparse.Namespace, model: str) -> dict:
    from kvmm_daemon.bench.direct_read import direct_read_bandwidth
    from kvmm_daemon.bench.memory_cgroup import MemoryCgroup, cached_bytes, drop_page_cache
    from kvmm_daemon.model.weight_file import WeightFile, weight_file_path, weight_key

    model_bytes = os.path.getsize(model)
    batches = [int(b) for b in args.batches.split(",")]
    budgets = _budgets(args.budgets, model_bytes)
    kv = parse_size(args.kv_budget, what="--kv-budget")
    state = Path(args.state_dir)
    subprocess.run(_child("kvmm_daemon.cli", "weights", "prepare", model, "--state-dir", str(state), "--quiet"),
                   check=True, stdout=subprocess.DEVNULL)
    wf = WeightFile.open(weight_file_path(state, model, weight_key(model, "auto", state)))
    seg = max(r.padded for r in wf.segments)
    drop_page_cache()
    direct = max(direct_read_bandwidth(str(wf.path), chunk=seg, depth=d) for d in (1, 2, 4))
    torch_rss = _torch_rss()
    common = ["--batches", args.batches, "--tokens", str(args.tokens), "--threads", str(args.threads),
              "--kv-budget", args.kv_budget, "--model", model, "--state-dir", str(state)]
    resident = _json_of(subprocess.run(_child("kvmm_daemon.bench.weights_run", *common),
                                       capture_output=True, text=True), "kvmm (resident)")
    result: dict = {"model": model, "model_bytes": model_bytes, "kvmm_stream_bytes": wf.model_bytes,
                    "direct_read_bytes_per_s": round(direct), "torch_import_rss": torch_rss,
                    "resident": resident, "budgets": {k: v for k, v in budgets.items()},
                    "decode_tokens_per_s": {}, "vs_llama_cpp": {}, "stall_share": {}, "bytes_read_per_token": {},
                    "flash_bandwidth_ratio": {}, "greedy_equal_to_resident": {}, "kvmm_runs": {},
                    "llama_cpp_runs": {}}
    for label, budget in budgets.items():
        drop_page_cache()
        cold = cached_bytes(model)
        limit = torch_rss + budget + kv + SLACK
        with MemoryCgroup("kvmm-bench-kvmm", limit) as cg:
            run = cg.run(_child("kvmm_daemon.bench.weights_run", "--budget", str(budget), *common), timeout=900)
        got = _json_of(run, "kvmm")
        got.update(cgroup_limit=limit, cgroup_peak=run.peak_bytes, oom_kills=run.oom_kills, cold_cached_bytes=cold)
        result["kvmm_runs"][label] = got
        if "error" in got:
            continue
        result["greedy_equal_to_resident"][label] = got["greedy_token_ids"] == resident.get("greedy_token_ids")
        for key in ("decode_tokens_per_s", "stall_share", "bytes_read_per_token"):
            result[key][label] = {str(b): got[str(b)][key] for b in batches}
        one = got[str(batches[0])]
        achieved = one["bytes_read_per_token"] * one["decode_tokens_per_s"]
        result["flash_bandwidth_ratio"][label] = round(achieved / direct, 3) if one["bytes_read_per_token"] else None
    if not args.no_llama_cpp:
        _llama(args, model, budgets, batches, result)
    _print_table(result, batches)
    return result


def _llama(args, model: str, budgets: dict[str, int], batches: list[int], result: dict) -> None:
    from kvmm_daemon.bench.memory_cgroup import MemoryCgroup, cached_bytes, drop_page_cache

    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        result["llama_cpp_error"] = "llama_cpp is not importable; pip install '.[llama]'"
        return
    base = ["--model", model, "--threads", str(args.threads)]
    for b in batches:
        probe = _json_of(subprocess.run(_child("kvmm_daemon.bench.llama_cpp_limited", *base, "--batch", str(b),
                                               "--baseline-only"), capture_output=True, text=True), "llama.cpp")
        result["llama_cpp_runs"][f"baseline_batch_{b}"] = probe
        if "error" in probe:
            continue
        for label, budget in budgets.items():
            drop_page_cache()
            cold = cached_bytes(model)
            limit = probe["anon_bytes"] + budget
            with MemoryCgroup("kvmm-bench-llama", limit) as cg:
                run = cg.run(_child("kvmm_daemon.bench.llama_cpp_limited", *base, "--batch", str(b),
                                    "--steps", str(args.tokens), "--max-seconds", str(args.llama_seconds)),
                             timeout=args.llama_seconds * 4 + 120)
            got = _json_of(run, "llama.cpp")
            got.update(cgroup_limit=limit, cgroup_peak=run.peak_bytes, oom_kills=run.oom_kills,
                       cold_cached_bytes=cold)
            result["llama_cpp_runs"][f"{label}/{b}"] = got
            mine = result["decode_tokens_per_s"].get(label, {}).get(str(b))
            if "decode_tokens_per_s" in got and mine:
                result["vs_llama_cpp"].setdefault(label, {})[str(b)] = round(mine / got["decode_tokens_per_s"], 2)


def _print_table(r: dict, batches: list[int]) -> None:
    print(f"model {format_size(r['model_bytes'])} (kvmm streams {format_size(r['kvmm_stream_bytes'])} form); "
          f"plain O_DIRECT {r['direct_read_bytes_per_s'] / 1e9:.2f} GB/s")
    print(f"{'budget':>8} {'batch':>5} {'kvmm tok/s':>10} {'llama.cpp':>10} {'ratio':>6} {'MB/token':>9} "
          f"{'stall':>6} {'flash':>6} {'greedy=':>7}")
    for label in r["budgets"]:
        for b in batches:
            k = r["decode_tokens_per_s"].get(label, {}).get(str(b))
            lc = r["llama_cpp_runs"].get(f"{label}/{b}", {}).get("decode_tokens_per_s")
            ratio = r["vs_llama_cpp"].get(label, {}).get(str(b))
            mb = r["bytes_read_per_token"].get(label, {}).get(str(b))
            st = r["stall_share"].get(label, {}).get(str(b))
            fl = r["flash_bandwidth_ratio"].get(label) if b == batches[0] else None
            eq = r["greedy_equal_to_resident"].get(label) if b == batches[0] else None
            cell = (lambda v, f: f.format(v) if v is not None else "-")
            print(f"{label:>8} {b:>5} {cell(k, '{:.1f}'):>10} {cell(lc, '{:.2f}'):>10} {cell(ratio, '{:.1f}x'):>6} "
                  f"{cell(mb and mb / 1e6, '{:.1f}'):>9} {cell(st, '{:.0%}'):>6} {cell(fl, '{:.2f}'):>6} "
                  f"{cell(eq, '{}'):>7}")
