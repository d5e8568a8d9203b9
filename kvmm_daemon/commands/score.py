"""`kvmm score`: teacher-forced top-1 next tokens, log-probs of the actual next tokens, and
perplexity for a text or a list of token ids (like llama-perplexity)."""
from __future__ import annotations

import argparse
import json

from kvmm_daemon.commands.common import add_engine_args, engine_config_from_args
from kvmm_daemon.errors import RequestError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="teacher-forced top-1, log-probs and perplexity", description=__doc__)
    p.add_argument("text", nargs="?", help="text to score (tokenized without a chat template)")
    p.add_argument("--token-ids", help="comma-separated token ids instead of text, e.g. 1,2,3")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_engine_args(p)
    p.set_defaults(func=run)


def parse_token_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise RequestError(f"--token-ids {text!r} is not a comma-separated list of integers") from None


def run(args: argparse.Namespace) -> int:
    from kvmm_daemon.engine.engine import Engine
    from kvmm_daemon.engine.scoring import score

    if (args.text is None) == (args.token_ids is None):
        raise RequestError("give either TEXT or --token-ids")
    engine = Engine.from_config(engine_config_from_args(args))
    ids = parse_token_ids(args.token_ids) if args.token_ids else engine.encode_prompt(text=args.text, raw=True)
    ids = engine.encode_prompt(token_ids=ids)
    result = score(engine, ids)
    if args.json:
        print(json.dumps(result.as_dict()))
        return 0
    decode = engine.tokenizer.decode
    print(f"{'pos':>4} {'next':>18} {'top1':>18} {'logprob':>9}")
    for i, (top, lp) in enumerate(zip(result.top1_next, result.logprob_of_next)):
        print(f"{i:>4} {decode([ids[i + 1]])!r:>18} {decode([top])!r:>18} {lp:>9.4f}")
    print(f"perplexity {result.perplexity:.4f} over {len(ids) - 1} predictions")
    return 0
