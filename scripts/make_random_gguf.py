#!/usr/bin/env python3
"""Write a random-weight Llama GGUF of a real shape (default: 1B, ~0.7 GB) for weight-streaming
benchmarks; tokenizer and chat template come from the embedded SmolLM2 GGUF.

examples:
  scripts/make_random_gguf.py /var/tmp/random-1b.gguf
  scripts/make_random_gguf.py --layers 2 --hidden 64 --heads 4 --kv-heads 2 --ffn 128 /tmp/tiny.gguf
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kvmm_daemon.bench.random_gguf import RandomGGUF  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    d = RandomGGUF()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output", help="GGUF file to write (replaced atomically)")
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--hidden", type=int, default=d.hidden)
    p.add_argument("--heads", type=int, default=d.heads)
    p.add_argument("--kv-heads", type=int, default=d.kv_heads)
    p.add_argument("--ffn", type=int, default=d.ffn)
    p.add_argument("--context-length", type=int, default=d.context_length)
    p.add_argument("--std", type=float, default=d.std, help="weight standard deviation")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--tokenizer-from", default=None,
                   help="GGUF whose tokenizer metadata is copied (default: the embedded SmolLM2)")
    args = p.parse_args(argv)
    if args.tokenizer_from is None:
        from kvmm_daemon.model.model_file import default_model_path
        args.tokenizer_from = default_model_path()
    spec = RandomGGUF(layers=args.layers, hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads,
                      ffn=args.ffn, context_length=args.context_length, std=args.std, seed=args.seed)
    t0 = time.perf_counter()
    path = spec.write(args.output, args.tokenizer_from)
    print(f"wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
