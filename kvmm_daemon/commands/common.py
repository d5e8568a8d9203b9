"""Options shared by several subcommands, and how they become configs and params."""
from __future__ import annotations

import argparse
import json
import sys

from kvmm_daemon.engine_config import EngineConfig
from kvmm_daemon.engine.outputs import GenerateResult
from kvmm_daemon.engine.sampling_params import SamplingParams


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", help="GGUF file or Llama safetensors directory (default: embedded SmolLM2-135M)")
    g.add_argument("--kv-budget", default="256MiB", help="bytes for the KV block pool (default 256MiB)")
    g.add_argument("--weight-budget", default=None, help="bytes the weight pool may hold, e.g. 22MiB; "
                   "the rest streams from flash (default: all resident)")
    g.add_argument("--state-dir", default=None, help="where weight files live (default: "
                   "$KVMM_STATE_DIR, /var/lib/kvmm or ~/.cache/kvmm)")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default 16)")
    g.add_argument("--max-model-len", type=int, default=2048, help="longest prompt+completion (default 2048)")
    g.add_argument("--max-num-seqs", type=int, default=64, help="sequences running at once (default 64)")
    g.add_argument("--max-batched-tokens", type=int, default=512, help="token budget per step (default 512)")
    g.add_argument("--kv-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    g.add_argument("--threads", type=int, default=None, help="compute threads (default: all cores)")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(model=args.model, kv_budget=args.kv_budget, weight_budget=args.weight_budget,
                        state_dir=args.state_dir,
                        block_size=args.block_size, max_model_len=args.max_model_len,
                        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_batched_tokens,
                        kv_dtype=args.kv_dtype, threads=args.threads)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--n", type=int, default=1, help="parallel samples sharing the prompt's KV")
    g.add_argument("--beam-width", type=int, default=1)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--raw", action="store_true", help="feed the prompt text without the chat template")
    p.add_argument("--session", default=None, help="session id: keep KV between turns")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def sampling_params_from_args(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed, n=args.n, beam_width=args.beam_width,
                          stop=tuple(args.stop), ignore_eos=args.ignore_eos)


def print_result(result: GenerateResult, as_json: bool, *, streamed: bool = False, extra: dict | None = None) -> None:
    if as_json:
        d = result.as_dict()
        if extra:
            d.update(extra)
        print(json.dumps(d))
        return
    if len(result.choices) > 1:
        for c in result.choices:
            print(f"--- choice {c.index} ({c.finish_reason})")
            print(c.text)
    elif not streamed:
        print(result.choices[0].text)
    u, t = result.usage, result.timings
    fmt = lambda v: "-" if v is None else f"{v:.1f}"
    print(f"[{u.prompt_tokens} prompt tokens ({u.cached_prompt_tokens} cached), {u.completion_tokens} completion; "
          f"ttft {fmt(t.ttft_s and t.ttft_s * 1000)} ms, prefill {fmt(t.prefill_tokens_per_s)} tok/s, "
          f"decode {fmt(t.decode_tokens_per_s)} tok/s]", file=sys.stderr)
