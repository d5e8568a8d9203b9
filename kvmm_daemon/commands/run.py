"""`kvmm run`: generate in-process, without a daemon (same options as `kvmm generate`)."""
from __future__ import annotations

import argparse
import sys

from kvmm_daemon.commands.common import (add_engine_args, add_sampling_args, engine_config_from_args,
                                         print_result, sampling_params_from_args)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="generate in-process on the embedded model (no daemon)",
                       description=__doc__)
    p.add_argument("prompt", help="prompt text (chat template applied unless --raw)")
    add_sampling_args(p)
    add_engine_args(p)
    p.add_argument("--show-kv", action="store_true", help="print KV pool statistics after the run")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvmm_daemon.engine.engine import Engine

    params = sampling_params_from_args(args)
    engine = Engine.from_config(engine_config_from_args(args))
    prompt = engine.encode_prompt(text=args.prompt, raw=args.raw)
    stream = not args.json and params.num_choices == 1

    def on_output(out) -> None:
        for d in out.deltas:
            sys.stdout.write(d.text)
        sys.stdout.flush()

    result = engine.generate(prompt, params, session_id=args.session, on_output=on_output if stream else None)
    if stream:
        print()
    stats = engine.statistics()
    print_result(result, args.json, streamed=stream, extra={"kv": stats.kv} if args.show_kv else None)
    if args.show_kv and not args.json:
        kv = stats.kv
        print(f"[kv pool: {kv['blocks_total']} blocks of {stats.block_size} tokens ({stats.block_bytes} B each); "
              f"allocated {kv['blocks_allocated']}, cached {kv['blocks_cached']}, free {kv['blocks_free']}]",
              file=sys.stderr)
    return 0
