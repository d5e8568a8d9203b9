"""`kvmm serve`: run the daemon (see kvmm_daemon/daemon/service.py and docs/service.md)."""
from __future__ import annotations

import argparse

# flag -> DaemonConfig/EngineConfig key; every flag also has a KVMM_<KEY> variable
FLAGS = {
    "--socket": ("socket", str, "Unix socket path (default /run/kvmm/kvmm.sock)"),
    "--socket-group": ("socket_group", str, "group owning the socket (default kvmm; '' = keep)"),
    "--model": ("model", str, "GGUF file or safetensors directory (default: embedded SmolLM2-135M)"),
    "--kv-budget": ("kv_budget", str, "bytes for the KV cache, e.g. 256MiB"),
    "--weight-budget": ("weight_budget", str, "bytes the weight pool may hold, e.g. 22MiB (the rest "
                        "streams from flash; default: all resident)"),
    "--state-dir": ("state_dir", str, "where prepared weight files and the device profile live "
                    "(default /var/lib/kvmm)"),
    "--max-model-len": ("max_model_len", int, "longest prompt + completion of one sequence"),
    "--threads": ("threads", int, "torch compute threads (default: all cores)"),
    "--swap-dir": ("swap_dir", str, "directory of the flash swap tier"),
    "--swap-size": ("swap_size", str, "size of the flash swap file"),
    "--mount": ("mount", str, "where to mount the swapfs view"),
    "--http-socket": ("http_socket", str, "Unix socket of the OpenAI-compatible HTTP API (off by default)"),
    "--http-listen": ("http_listen", str, "HOST:PORT (or PORT on loopback) for the HTTP API on TCP; "
                      "needs http_api_keys in the config (off by default)"),
    "--grace-period": ("grace_period_s", float, "seconds in-flight requests get on SIGTERM"),
    "--admit-wait-ms": ("admit_wait_ms", float, "how long a step may wait for the next requests "
                        "of clients whose requests just finished (default 6; 0 = never)"),
    "--log-level": ("log_level", str, "debug, info, warning or error"),
}


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="run the kvmm daemon on a Unix socket",
                              description="Run the kvmm daemon. Settings come from the TOML file "
                              "(--config or $KVMM_CONFIG), then KVMM_<KEY> variables, then flags.")
    p.add_argument("--config", metavar="FILE", help="TOML file with [daemon] and [engine] tables")
    for flag, (key, typ, text) in FLAGS.items():
        p.add_argument(flag, dest=key, type=typ, default=None, help=text)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvmm_daemon.daemon.daemon_config import DaemonConfig
    from kvmm_daemon.daemon.service import run_service

    flags = {key: getattr(args, key) for key, _, _ in FLAGS.values()}
    cfg = DaemonConfig.load(args.config, flags=flags)
    return run_service(cfg)
