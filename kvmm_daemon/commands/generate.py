"""`kvmm generate`: one request through the daemon, streamed to stdout or as one JSON object.

It takes the options of `kvmm run` (commands/common.py) and prints the same way, so the two
commands differ only in where the engine runs.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from kvmm_daemon.commands.common import add_sampling_args, print_result, sampling_params_from_args


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate through the daemon",
                              description="Send one prompt to the kvmm daemon and print the answer as it streams.")
    p.add_argument("prompt", nargs="?", metavar="PROMPT", help="prompt text ('-' or absent: read stdin)")
    p.add_argument("--socket", metavar="PATH", help="daemon socket (default $KVMM_SOCKET or /run/kvmm/kvmm.sock)")
    p.add_argument("--token-ids", metavar="IDS", help="comma-separated prompt token ids instead of text")
    add_sampling_args(p)
    p.set_defaults(func=run)


def prompt_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The prompt/token_ids keyword arguments of Client.generate."""
    from kvmm_daemon.errors import RequestError

    if args.token_ids:
        try:
            return {"token_ids": [int(t) for t in args.token_ids.split(",")]}
        except ValueError:
            raise RequestError(f"--token-ids {args.token_ids!r} must be comma-separated integers") from None
    text = args.prompt
    if text is None or text == "-":
        text = sys.stdin.read()
    return {"prompt": text}


def to_generate_result(result):
    """A client Result as the engine's GenerateResult (the shape `kvmm run` prints)."""
    from kvmm_daemon.engine.outputs import Choice, GenerateResult, Timings, Usage

    choices = [Choice(c["index"], c["text"], c["token_ids"], c["finish_reason"]) for c in result.choices]
    return GenerateResult(result.request_id, result.prompt_token_ids, choices, Usage(**result.usage),
                          Timings(**result.timings))


def run(args: argparse.Namespace) -> int:
    from kvmm_daemon.client import Client

    params = sampling_params_from_args(args).to_dict()
    prompt = prompt_from_args(args)
    stream = not args.json and max(params["n"], params["beam_width"]) == 1
    with Client(args.socket) as client:
        if not stream:
            result = client.generate(raw=args.raw, session=args.session, **prompt, **params)
        else:
            with client.stream(raw=args.raw, session=args.session, **prompt, **params) as s:
                for delta in s:
                    sys.stdout.write(delta.text)
                    sys.stdout.flush()
            print()
            result = s.result
    print_result(to_generate_result(result), args.json, streamed=stream)
    return 0
