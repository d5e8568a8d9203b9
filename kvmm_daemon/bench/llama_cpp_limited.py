"""llama.cpp (llama-cpp-python, mmap as it defaults to) decoding under a memory limit: the
baseline of `kvmm bench weights`.

Run as a child process (`python -m kvmm_daemon.bench.llama_cpp_limited ...`), it loads the
GGUF with mmap, creates its context (n_ctx sized to the run), and prints one JSON object:
its anonymous memory before the model and after a warm-up (`anon_bytes`: what it holds of
its own, KV and compute buffers included; the weights are file pages), then, unless
--baseline-only, aggregate
greedy decode tokens/s at --batch sequences after a warm-up, and the bytes it read from
storage per decoded token (/proc/self/io read_bytes: page-cache misses of the mapping).
The parent puts it in a MemoryCgroup of anon_bytes + the weight budget, after dropping the
page cache, so that it has exactly the budget's bytes for weights, like kvmm.
"""
from __future__ import annotations

import argparse
import json
import time


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _read_bytes() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    return 0


def run(args: argparse.Namespace) -> dict:
    import llama_cpp

    from kvmm_daemon.bench.llama_cpp_ref import LlamaCpp

    out = {"llama_cpp_python": llama_cpp.__version__, "anon_before_model": _status("RssAnon")}
    llm = LlamaCpp(args.model, threads=args.threads, max_seqs=args.batch, n_ctx_per_seq=args.n_ctx_per_seq)
    prompts = [[(7 * s + j) % 1000 + 100 for j in range(8)] for s in range(args.batch)]
    llm.decode_tokens_per_s(prompts, 2)                     # warm-up: same shapes, context warm
    # its own memory once warm (KV, compute buffers, allocator): the weights are file pages
    out.update(anon_bytes=_status("RssAnon"), **llm.settings)
    if args.baseline_only:
        llm.close()
        return out
    r0 = _read_bytes()
    tps = llm.decode_tokens_per_s(prompts, args.steps, max_seconds=args.max_seconds)
    tokens = llm.last_steps * args.batch
    out.update(decode_tokens_per_s=round(tps, 3), steps=llm.last_steps,
               bytes_read_per_token=round((_read_bytes() - r0) / tokens), peak_rss=_status("VmHWM"))
    llm.close()
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--max-seconds", type=float, default=30.0)
    p.add_argument("--n-ctx-per-seq", type=int, default=64)
    p.add_argument("--baseline-only", action="store_true")
    print(json.dumps(run(p.parse_args(argv))), flush=True)


if __name__ == "__main__":
    main()
