"""`kvmm bench decode`: tokens/s of the engine on the model, and what paging costs.

* decode tokens/s at batch 1, 8, 16 and 32: B requests with short distinct prompts decode
  `--decode-tokens` tokens each (ignore_eos); only steps where every sequence decodes count;
* prefill tokens/s: one `--prefill-len`-token prompt, cold (no prefix cache);
* what paging costs attention (`paging_overhead.py`): each attention path (the native
  kernel, the torch path) on one layer of the engine's own arena with blocks scattered as a
  churned BlockPool hands them out, against the same path on the same data in order in a
  compact huge-page buffer; SDPA on unpaged tensors as a third column. Grid: batch 1/8/32 x
  context 256/1024/2048 x 1 and 2 threads (--attention-*), 8 layers taken in turn as a
  step does (--attention-layers 1: one layer, cache-hot), best call of interleaved rounds;
  overhead = paged / contiguous (goal <= 1.10 in every cell). `--attention-only` runs just
  the grid;
* with --vs-llama-cpp: llama.cpp (llama-cpp-python, optional) on the same GGUF in the same
  run, same threads and prompts: prefill and aggregate decode tokens/s per batch size.
"""
from __future__ import annotations

import argparse
import time


from kvmm_daemon.engine_config import EngineConfig
from kvmm_daemon.engine.sampling_params import SamplingParams

PROMPT = ("The history of the city began with a small settlement on the river, where farmers and "
          "traders met every season to exchange grain, salt and news from distant places. ")


def _engine(args: argparse.Namespace):
    from kvmm_daemon.engine.engine import Engine
    return Engine.from_config(EngineConfig(model=args.model, kv_budget=args.kv_budget, threads=args.threads,
                                           max_num_batched_tokens=512, max_num_seqs=64))


def measure_decode(engine, batch: int, tokens: int, tag: int) -> float:
    """Aggregate decode tokens/s with `batch` sequences decoding together."""
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    base = engine.tokenizer.encode(PROMPT)
    for i in range(batch):
        engine.add_request(f"d{tag}-{i}", [base[(i + tag) % len(base)]] + base[:15], params)
    decoded, elapsed = 0, 0.0
    while engine.has_unfinished_requests():
        running = engine.scheduler.running
        all_decode = (not engine.scheduler.waiting and len(running) == batch
                      and all(s.num_uncomputed == 1 and r.forked for r in running for s in r.seqs))
        t0 = time.perf_counter()
        engine.step()
        if all_decode:
            elapsed += time.perf_counter() - t0
            decoded += batch
    return decoded / elapsed if elapsed else 0.0


def measure_prefill(engine, length: int) -> float:
    ids = (engine.tokenizer.encode(PROMPT) * (length // 10 + 1))[:length]
    ids[0] = (ids[0] + int(time.time())) % 1000  # distinct from anything cached
    t0 = time.perf_counter()
    engine.generate(ids, SamplingParams(max_tokens=1))
    return length / (time.perf_counter() - t0)


def attention_grid(spec, args: argparse.Namespace) -> dict:
    """The paging-overhead grid (bench/paging_overhead.py) with the model's attention shapes."""
    from kvmm_daemon.bench.paging_overhead import Geometry, paging_overhead

    geo = Geometry(num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads,
                   head_dim=spec.head_dim, num_layers=spec.num_layers)
    return paging_overhead(geo, batches=_ints(args.attention_batches),
                           contexts=_ints(args.attention_contexts),
                           threads=_ints(args.attention_threads), rounds=args.attention_rounds,
                           layers=args.attention_layers, layers_per_piece=args.kv_layers_per_piece)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def llama_cpp_figures(model_path: str, threads: int, prefill_len: int, tokens: int,
                      batches: list[int], prompt_ids: list[int]) -> dict:
    """The same figures from llama.cpp on the same file, same threads, same prompts."""
    try:
        from kvmm_daemon.bench.llama_cpp_ref import LlamaCpp
        # n_ctx sized to the run: the longest of one prefill and max(batches) x (prompt + decode)
        per_seq = max(16 + tokens + 8, -(-(prefill_len + 8) // max(batches)))
        ref = LlamaCpp(model_path, threads=threads, max_seqs=max(batches), n_ctx_per_seq=per_seq)
    except ImportError:
        return {"error": "llama-cpp-python is not installed; pip install '.[llama]' (compiles ~10 min)"}
    try:
        ids = (prompt_ids * (prefill_len // len(prompt_ids) + 1))[:prefill_len]
        ref.prefill_tokens_per_s(ids[:64])             # warm-up, as kvmm's engine is warmed up
        prefill = ref.prefill_tokens_per_s(ids)        # timed on a warm context
        decode = {}
        for b in batches:
            prompts = [[prompt_ids[(i + b) % len(prompt_ids)]] + prompt_ids[:15] for i in range(b)]
            ref.decode_tokens_per_s(prompts, 2)        # warm-up at this batch size
            decode[str(b)] = round(ref.decode_tokens_per_s(prompts, tokens), 1)
        return {"decode_tokens_per_s": decode, "prefill_tokens_per_s": round(prefill, 1), **ref.settings}
    finally:
        ref.close()


def register_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="GGUF file (default: embedded SmolLM2-135M)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kv-budget", default="512MiB")
    p.add_argument("--batches", default="1,8,16,32")
    p.add_argument("--decode-tokens", type=int, default=48)
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--vs-llama-cpp", action="store_true", help="also run llama.cpp on the same GGUF")
    p.add_argument("--attention-only", action="store_true",
                   help="only the paged-vs-contiguous attention grid (no decode/prefill figures)")
    p.add_argument("--attention-batches", default="1,8,32", help="batch sizes of the grid")
    p.add_argument("--attention-contexts", default="256,1024,2048", help="contexts of the grid")
    p.add_argument("--attention-threads", default="1,2", help="thread counts of the grid")
    p.add_argument("--attention-rounds", type=int, default=4,
                   help="interleaved rounds of 10 calls per variant; the best call counts")
    p.add_argument("--kv-layers-per-piece", type=int, default=None,
                   help="the KV arena's layers per piece of a block (1 = layer-major, the model's layer"
                        " count = block-major; default: the engine's)")
    p.add_argument("--attention-layers", type=int, default=8,
                   help="layers taken in turn, call after call, as a decode step does (1: the"
                        " same layer every call, cache-hot)")


def run_decode_bench(args: argparse.Namespace) -> dict:
    import torch  # here, not at import: `kvmm --help` stays fast

    from kvmm_daemon.bench.paging_overhead import print_table

    torch.set_num_threads(args.threads)
    engine = _engine(args)
    spec = engine.spec
    result: dict = {"threads": args.threads, "model": spec.name}
    if not args.attention_only:
        measure_decode(engine, 1, 4, tag=99)      # warm-up
        batches = [int(b) for b in args.batches.split(",")]
        result["decode_tokens_per_s"] = {
            str(b): round(measure_decode(engine, b, args.decode_tokens, tag=b), 1) for b in batches}
        result["prefill_tokens_per_s"] = round(measure_prefill(engine, args.prefill_len), 1)
        if args.vs_llama_cpp:
            from kvmm_daemon.model.model_file import default_model_path
            result["llama_cpp"] = llama_cpp_figures(
                str(args.model or default_model_path()), args.threads, args.prefill_len,
                args.decode_tokens, batches, engine.tokenizer.encode(PROMPT))
    del engine                    # the grid allocates an arena of its own
    result["attention"] = attention_grid(spec, args)
    result["paged_attention_overhead"] = result["attention"]["worst_overhead"]
    torch.set_num_threads(args.threads)
    ref = result.get("llama_cpp", {})
    if not args.attention_only:
        print(f"{'figure':<28}{'kvmm':>12}{'llama.cpp':>12}")
        for b, v in result["decode_tokens_per_s"].items():
            other = ref.get("decode_tokens_per_s", {}).get(b, "-")
            print(f"{'decode tok/s, batch ' + b:<28}{v:>12}{other:>12}")
        print(f"{'prefill tok/s':<28}{result['prefill_tokens_per_s']:>12}"
              f"{ref.get('prefill_tokens_per_s', '-'):>12}\n")
    print_table(result["attention"])
    if "error" in ref:
        print(f"llama.cpp: {ref['error']}")
    return result
