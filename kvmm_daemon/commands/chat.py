"""`kvmm chat`: an interactive multi-turn conversation kept in a daemon session.

Each line you type is one user turn; the session keeps the conversation's KV in the daemon,
so a turn computes only its own tokens (`/usage` after a turn shows cached_prompt_tokens).
Commands: /usage toggles the per-turn usage line, /quit (or Ctrl-D) ends. The session is
deleted at exit unless --keep (or --session names an existing one to continue).
"""
from __future__ import annotations

import argparse
import sys



def register(subparsers) -> None:
    p = subparsers.add_parser("chat", help="interactive multi-turn chat through the daemon")
    p.add_argument("--socket", metavar="PATH", help="daemon socket (default $KVMM_SOCKET or /run/kvmm/kvmm.sock)")
    p.add_argument("--session", metavar="ID", help="continue this session instead of opening a new one")
    p.add_argument("--keep", action="store_true", help="keep the session after exit")
    p.add_argument("--system", metavar="TEXT", help="system prompt of the first turn")
    p.add_argument("--max-tokens", type=int, default=256, metavar="N")
    p.add_argument("--temperature", type=float, default=None, metavar="T")
    p.add_argument("--top-p", type=float, default=None, metavar="P")
    p.add_argument("--top-k", type=int, default=None, metavar="K")
    p.add_argument("--seed", type=int, default=None, metavar="S")
    p.add_argument("--usage", action="store_true", help="print token usage after every turn")
    p.set_defaults(func=run)


def chat_loop(client, session: str, params: dict, lines, out, *, system: str | None = None,
              show_usage: bool = False) -> int:
    """Run turns for each input line; returns the number of turns answered."""
    turns = 0
    for line in lines:
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/usage":
            show_usage = not show_usage
            continue
        messages = [{"role": "user", "content": line}]
        if system and turns == 0:
            messages.insert(0, {"role": "system", "content": system})
        with client.stream(messages=messages, session=session, **params) as s:
            for delta in s:
                out.write(delta.text)
                out.flush()
        out.write("\n")
        turns += 1
        if show_usage and s.result is not None:
            u = s.result.usage
            out.write(f"[prompt {u['prompt_tokens']} (cached {u['cached_prompt_tokens']}), "
                      f"completion {u['completion_tokens']}]\n")
    return turns


def _input_lines():
    while True:
        try:
            yield input("> " if sys.stdin.isatty() else "")
        except EOFError:
            return


def run(args: argparse.Namespace) -> int:
    from kvmm_daemon.client import Client

    keys = ("max_tokens", "temperature", "top_p", "top_k", "seed")
    params = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    with Client(args.socket) as client:
        session = args.session or client.open_session()
        try:
            chat_loop(client, session, params, _input_lines(), sys.stdout, system=args.system,
                      show_usage=args.usage)
        finally:
            if not (args.keep or args.session):
                client.delete_session(session)
    return 0
