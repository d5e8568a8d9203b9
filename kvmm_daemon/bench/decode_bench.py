"""`kvmm bench decode`: tokens/s of the engine on the model, and what paging costs.

* decode tokens/s at batch 1, 8, 16 and 32: B requests with short distinct prompts decode
  `--decode-tokens` tokens each (ignore_eos); only steps where every sequence decodes count;
* prefill tokens/s: one `--prefill-len`-token prompt, cold (no prefix cache);
* paged vs contiguous attention: the paged decode kernel against contiguous SDPA on the same
  shapes (the model's heads, batch 1/8/32, context 256 and 1024), per-call wall time;
  overhead = paged / contiguous - 1;
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


def _time(fn, reps: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def attention_overhead(spec, block_size: int = 16) -> list[dict]:
    import torch  # here, not at import: `kvmm --help` stays fast

    from kernels import paged_attention_decode
    from kernels.torch_paged import contiguous_decode_sdpa

    rows = []
    h, hkv, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
    for batch in (1, 8, 32):
        for ctx in (256, 1024):
            g = torch.Generator().manual_seed(batch * ctx)
            nb = -(-ctx // block_size)
            arena = torch.randn(batch * nb + 8, spec.num_layers if batch == 1 else 2, 2, block_size, hkv, d, generator=g)
            k_cache, v_cache = arena[:, 0, 0], arena[:, 0, 1]
            tables = torch.randperm(arena.shape[0], generator=g)[:batch * nb].view(batch, nb).to(torch.int32)
            seq_lens = torch.full((batch,), ctx, dtype=torch.int32)
            q = torch.randn(batch, h, d, generator=g)
            k = k_cache[tables.long()].reshape(batch, nb * block_size, hkv, d).contiguous()
            v = v_cache[tables.long()].reshape(batch, nb * block_size, hkv, d).contiguous()
            scale = d ** -0.5
            reps = max(20, 2000 // (batch * ctx // 64))
            paged = _time(lambda: paged_attention_decode(q, k_cache, v_cache, tables, seq_lens, scale), reps)
            contig = _time(lambda: contiguous_decode_sdpa(q, k, v, seq_lens, scale), reps)
            rows.append({"batch": batch, "context": ctx, "paged_us": round(paged * 1e6, 1),
                         "contiguous_us": round(contig * 1e6, 1), "overhead": round(paged / contig - 1, 4)})
    return rows


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


def run_decode_bench(args: argparse.Namespace) -> dict:
    import torch  # here, not at import: `kvmm --help` stays fast

    torch.set_num_threads(args.threads)
    engine = _engine(args)
    measure_decode(engine, 1, 4, tag=99)      # warm-up
    batches = [int(b) for b in args.batches.split(",")]
    decode = {str(b): round(measure_decode(engine, b, args.decode_tokens, tag=b), 1) for b in batches}
    prefill = round(measure_prefill(engine, args.prefill_len), 1)
    attn = attention_overhead(engine.spec)
    overhead = max(r["overhead"] for r in attn if r["batch"] == 8)
    result = {"decode_tokens_per_s": decode, "prefill_tokens_per_s": prefill,
              "paged_attention_overhead": overhead, "attention": attn, "threads": args.threads,
              "model": engine.spec.name}
    if args.vs_llama_cpp:
        from kvmm_daemon.model.model_file import default_model_path
        result["llama_cpp"] = llama_cpp_figures(str(args.model or default_model_path()), args.threads,
                                                args.prefill_len, args.decode_tokens, batches,
                                                engine.tokenizer.encode(PROMPT))
    ref = result.get("llama_cpp", {})
    print(f"{'figure':<28}{'kvmm':>12}{'llama.cpp':>12}")
    for b, v in decode.items():
        other = ref.get("decode_tokens_per_s", {}).get(b, "-")
        print(f"{'decode tok/s, batch ' + b:<28}{v:>12}{other:>12}")
    print(f"{'prefill tok/s':<28}{prefill:>12}{ref.get('prefill_tokens_per_s', '-'):>12}")
    print(f"\n{'batch':>6}{'context':>9}{'paged us':>11}{'contig us':>11}{'overhead':>10}")
    for r in attn:
        print(f"{r['batch']:>6}{r['context']:>9}{r['paged_us']:>11}{r['contiguous_us']:>11}{r['overhead']:>10.1%}")
    if "error" in ref:
        print(f"llama.cpp: {ref['error']}")
    return result
