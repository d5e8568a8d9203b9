"""The `kvmm` command line: one argparse parser, one module per subcommand.

Each module in `kvmm_daemon.commands` defines `register(subparsers)` (adds its parser and sets
`func`) and a `run(args) -> int`. Modules are imported lazily only when registered so that
`kvmm --help` stays fast. A `KvmmError` is printed as one line `kvmm: error: ...` with exit 2;
anything else is a bug and keeps its traceback.

Run as a program (argv None), the commands that compute in this process first choose their
OpenMP runtime (`kvmm_daemon.openmp_runtime`), which may re-execute the interpreter before
torch is imported; called with an argv (tests, embedding) the process is left as it is.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from kvmm_daemon import openmp_runtime
from kvmm_daemon.errors import KvmmError

# subcommand name -> module under kvmm_daemon.commands
COMMANDS = {
    "serve": "serve",
    "generate": "generate",
    "run": "run",
    "score": "score",
    "chat": "chat",
    "stats": "stats",
    "sessions": "sessions",
    "trace": "trace",
    "bench": "bench",
    "weights": "weights",
    "view-mounter": "view_mounter",
}
# the subcommands that run the model in this process
COMPUTE_COMMANDS = {"serve", "run", "score", "bench"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvmm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in COMMANDS.items():
        try:
            mod = importlib.import_module(f"kvmm_daemon.commands.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"kvmm_daemon.commands.{module}":
                raise
            continue  # subcommand not built yet
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is None and sys.argv[1:2] and sys.argv[1] in COMPUTE_COMMANDS:
        try:
            openmp_runtime.ensure()
        except KvmmError as exc:
            print(f"kvmm: error: {exc}", file=sys.stderr)
            return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KvmmError as exc:
        print(f"kvmm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
