"""`kvmm sessions`: list, open and delete your sessions (root sees everybody's)."""
from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    p = subparsers.add_parser("sessions", help="list, open or delete sessions")
    p.add_argument("--socket", metavar="PATH", help="daemon socket (default $KVMM_SOCKET or /run/kvmm/kvmm.sock)")
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = sub.add_parser("ls", help="list sessions")
    ls.add_argument("--json", action="store_true", help="print a JSON list")
    new = sub.add_parser("new", help="open a session (prints its id)")
    new.add_argument("name", nargs="?", help="session name (default: generated)")
    rm = sub.add_parser("rm", help="delete a session and free its KV")
    rm.add_argument("ids", nargs="+", metavar="ID")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvmm_daemon.client import Client

    with Client(args.socket) as client:
        if args.action == "new":
            print(client.open_session(args.name))
        elif args.action == "rm":
            for sid in args.ids:
                client.delete_session(sid)
        else:
            sessions = client.sessions()
            if args.json:
                print(json.dumps(sessions))
            else:
                print(f"{'ID':<32} {'OWNER':>6} {'TOKENS':>7} {'KV':>4} {'BUSY':>5}")
                for s in sessions:
                    print(f"{s['session']:<32} {s['owner_uid']:>6} {s['num_tokens']:>7} "
                          f"{'yes' if s['kv_resident'] else 'no':>4} {'yes' if s['busy'] else 'no':>5}")
    return 0
