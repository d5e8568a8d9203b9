"""`kvmm weights`: prepare (and inspect) the flash layout of a model's weights."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("weights", help="prepare the weight file that weight streaming reads")
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    prep = sub.add_parser("prepare", help="write the weight file of a model in the state directory")
    prep.add_argument("model_path", nargs="?", metavar="MODEL", help="GGUF file or safetensors dir "
                      "(default: the embedded SmolLM2-135M)")
    prep.add_argument("--model", dest="model_opt", help=argparse.SUPPRESS)
    prep.add_argument("--state-dir", help="where weight files live (default: $KVMM_STATE_DIR, "
                      "/var/lib/kvmm or ~/.cache/kvmm)")
    prep.add_argument("--linear-mode", default="auto", help=argparse.SUPPRESS)
    prep.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvmm_daemon.model.model_file import default_model_path, open_model
    from kvmm_daemon.model.weight_file import describe
    from kvmm_daemon.model.weight_store import prepare, state_dir

    path = args.model_path or args.model_opt or default_model_path()
    model_file = open_model(path)
    wf = prepare(model_file, path, state_dir(args.state_dir), linear_mode=args.linear_mode,
                 progress=not args.quiet)
    print(describe(wf))
    return 0
