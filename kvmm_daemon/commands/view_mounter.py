"""`kvmm view-mounter`: the privileged helper that mounts the swapfs view for the daemon
(kvmm-view.service; see kvmm_daemon/daemon/view_mounter.py and docs/service.md)."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("view-mounter", help="mount the swapfs view for an unprivileged daemon",
                              description="Mount engine.mount with allow_other for the daemon's "
                              "user and hand it the /dev/fuse fd over the socket passed by systemd "
                              "(kvmm-view.socket) or bound at daemon.view_mounter. Needs CAP_SYS_ADMIN.")
    p.add_argument("--config", metavar="FILE", help="TOML file with [daemon] and [engine] tables")
    p.add_argument("--user", default="kvmm", help="the daemon's user, who may ask (default kvmm)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os
    import socket

    from kvmm_daemon.daemon.daemon_config import DaemonConfig
    from kvmm_daemon.daemon.listener import inherited_sockets
    from kvmm_daemon.daemon.logs import setup_logging
    from kvmm_daemon.daemon.view_mounter import ViewMounter
    from kvmm_daemon.errors import ConfigError

    cfg = DaemonConfig.load(args.config)
    setup_logging(cfg.log_level)
    if not cfg.engine.mount:
        raise ConfigError("engine.mount is not set: there is no view to mount; set it in the config")
    try:
        mounter = ViewMounter(cfg.engine.mount, args.user)
    except KeyError:
        raise ConfigError(f"user {args.user!r} does not exist; give the daemon's user with --user") from None
    inherited = inherited_sockets()
    if inherited:
        listener = next(iter(inherited.values()))
    else:
        if not cfg.view_mounter:
            raise ConfigError("no socket: run under kvmm-view.socket or set daemon.view_mounter")
        if os.path.exists(cfg.view_mounter):
            os.unlink(cfg.view_mounter)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(cfg.view_mounter)
        os.chown(cfg.view_mounter, mounter.uid, mounter.gid)
        os.chmod(cfg.view_mounter, 0o600)
        listener.listen(4)
    try:
        mounter.serve_forever(listener)
    except KeyboardInterrupt:
        pass
    return 0
