"""The service's life: load the engine, listen, tell systemd, serve, drain on SIGTERM.

Order matters for systemd: READY=1 is sent only once the model is loaded and the socket
accepts, so `systemctl start kvmm` returns when clients can be served; STOPPING=1 is sent as
soon as SIGTERM arrives; the exit status is 0 after a drain (whether requests finished in the
grace period or were cancelled) and 1 when the engine failed, so Restart=on-failure restarts
only real failures. SIGINT (Ctrl-C on a terminal) drains like SIGTERM.

Left out: SIGHUP reload (see config.py).
"""
from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any

import trio

from kvmm_daemon.daemon.config import DaemonConfig
from kvmm_daemon.daemon.listener import Listener, open_listener
from kvmm_daemon.daemon.logs import setup_logging
from kvmm_daemon.daemon.notify import SystemdNotifier
from kvmm_daemon.daemon.server import Server, open_trio_listener

log = logging.getLogger("kvmm.service")


async def serve_engine(cfg: DaemonConfig, engine: Any, listener: Listener, notifier: SystemdNotifier,
                       *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve `engine` on `listener` until SIGTERM/SIGINT, then drain and return.

    `task_status.started(server)` fires once the socket accepts and READY=1 has been sent."""
    server = Server(cfg, engine, block_size=cfg.engine.block_size, watchdog=notifier.watchdog,
                    ping_interval_s=notifier.ping_interval_s)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.loop.run)
            await nursery.start(server.serve, open_trio_listener(listener.sock))
            if cfg.engine.mount and getattr(engine, "tier", None) is not None:
                await nursery.start(serve_view, engine.tier.swap, cfg.engine.mount)
            notifier.ready(f"serving on {listener.path}")
            log.info("serving on %s (pid uid checks via SO_PEERCRED, watchdog %s)", listener.path,
                     f"every {notifier.ping_interval_s:.1f} s" if notifier.ping_interval_s else "off")
            task_status.started(server)
            async for signum in signals:
                log.info("received %s: draining", signal.Signals(signum).name)
                break
            notifier.stopping(f"draining {len(server.records)} requests")
            await server.drain(cfg.grace_period_s)
            nursery.cancel_scope.cancel()
    log.info("stopped")


async def serve_view(space, mountpoint: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """The swapfs FUSE view, which must never take the service down: a mount that fails,
    is aborted too often or is unmounted from outside leaves the daemon serving (and the
    flash tier working) without its view, with the reason in the log."""
    from swapfs.fuse_mount import serve_fuse

    class _Started:
        done = False

        def started(self, value=None) -> None:
            self.done = True
            task_status.started()

    status = _Started()
    try:
        await serve_fuse(space, mountpoint, allow_other=os.geteuid() == 0, task_status=status,
                         session_namer=lambda uid, name: f"{uid}:{name}")   # the server's session ids
    except Exception:
        log.exception("swapfs view at %s failed; serving on without it", mountpoint)
    if not status.done:
        task_status.started()


def load_engine(cfg: DaemonConfig, notifier: SystemdNotifier) -> Any:
    from kvmm_daemon.engine.engine import Engine   # torch import: only the server needs it

    notifier.status("loading model")
    t0 = time.perf_counter()
    engine = Engine.from_config(cfg.engine)
    log.info("model %s loaded in %.1f s", cfg.engine.model or "(embedded SmolLM2-135M)",
             time.perf_counter() - t0)
    return engine


def run_service(cfg: DaemonConfig) -> int:
    """`kvmm serve`: the whole life of the daemon; returns the exit status."""
    setup_logging(cfg.log_level)
    notifier = SystemdNotifier.from_env()
    try:
        engine = load_engine(cfg, notifier)
        listener = open_listener(cfg.socket, gid=cfg.socket_gid(), mode=cfg.socket_mode)
    except Exception:
        notifier.close()
        raise
    try:
        trio.run(serve_engine, cfg, engine, listener, notifier)
    except Exception:
        log.critical("the daemon failed", exc_info=True)
        return 1
    finally:
        listener.close()
        notifier.close()
        engine.close()            # flushes the flash tier: sessions survive the restart
    return 0
