"""The service's life: load the engine, listen, tell systemd, serve, drain on SIGTERM.

Order matters for systemd: READY=1 is sent only once the model is loaded and the socket
accepts, so `systemctl start kvmm` returns when clients can be served; STOPPING=1 is sent as
soon as SIGTERM arrives; the exit status is 0 after a drain (whether requests finished in the
grace period or were cancelled) and 1 when the engine failed, so Restart=on-failure restarts
only real failures. SIGINT (Ctrl-C on a terminal) drains like SIGTERM.

Left out: SIGHUP reload (see config.py).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import queue
import signal
import socket
import threading
import time
from typing import Any, Sequence

import trio

from kvmm_daemon import openmp_runtime
from kvmm_daemon.daemon.daemon_config import DaemonConfig
from kvmm_daemon.daemon.http_server import HttpServer
from kvmm_daemon.daemon.listener import Listener, inherited_sockets, open_listener
from kvmm_daemon.daemon.openai_api import OpenAIApi, model_id
from kvmm_daemon.daemon.logs import setup_logging
from kvmm_daemon.daemon.notify import SystemdNotifier
from kvmm_daemon.daemon.server import Server, open_trio_listener
from kvmm_daemon.errors import ConfigError

log = logging.getLogger("kvmm.service")


async def serve_engine(cfg: DaemonConfig, engine: Any, listener: Listener, notifier: SystemdNotifier,
                       http_listeners: Sequence[Listener] = (), *, on_loop=None,
                       stop: trio.Event | None = None, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve `engine` on `listener` (msgpack) and `http_listeners` (the OpenAI-compatible API)
    until SIGTERM/SIGINT (or `stop`, when trio runs outside the main thread), then drain and
    return. With `on_loop`, the engine loop is handed to it and stepped by the caller's thread
    (run_service: the main thread) instead of a thread of its own.

    `task_status.started(server)` fires once the sockets accept and READY=1 has been sent."""
    view = ViewStatus(cfg.engine.mount if getattr(engine, "tier", None) is not None else None)
    server = Server(cfg, engine, block_size=cfg.engine.block_size, watchdog=notifier.watchdog,
                    ping_interval_s=notifier.ping_interval_s, view=view,
                    kv_block_bytes=engine.runner.kv_cache.block_bytes if hasattr(engine, "runner") else 0,
                    engine_in_caller_thread=on_loop is not None)
    if on_loop is not None:
        on_loop(server.loop)
    http = None
    if http_listeners:
        api = OpenAIApi(server, model=model_id(cfg.engine.model), api_keys=cfg.api_key_uids(),
                        max_body=cfg.max_frame_bytes)
        http = HttpServer(api.app(), max_clients=cfg.max_clients)
    signals = (contextlib.nullcontext(None) if stop is not None
               else trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT))
    with signals as received:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.loop.run)
            await nursery.start(server.serve, open_trio_listener(listener.sock))
            for lst in http_listeners:
                await nursery.start(http.serve, lst.sock)
                log.info("OpenAI-compatible HTTP API on %s", lst.path)
            if view.mountpoint:
                await nursery.start(serve_view, engine.tier.swap, view, view_hooks(server, engine),
                                    cfg.view_mounter, notifier, listener.path)
            notifier.ready(f"serving on {listener.path}" + view.degraded_note())
            log.info("serving on %s (pid uid checks via SO_PEERCRED, watchdog %s)", listener.path,
                     f"every {notifier.ping_interval_s:.1f} s" if notifier.ping_interval_s else "off")
            task_status.started(server)
            if received is None:
                await stop.wait()
                log.info("received a stop signal: draining")
            else:
                async for signum in received:
                    log.info("received %s: draining", signal.Signals(signum).name)
                    break
            notifier.stopping(f"draining {len(server.records)} requests")
            if http is not None:
                http.stop_accepting()
            await server.drain(cfg.grace_period_s)
            nursery.cancel_scope.cancel()
    log.info("stopped")


def view_hooks(server: Server, engine: Any):
    """What the view tells the engine and the quotas: imports are checked against the model
    and counted, `rm -r` deletes in the engine (aborting a running turn), an import is listed
    at once."""
    from swapfs.import_check import ImportPolicy
    from swapfs.view_hooks import ViewHooks
    return ViewHooks(import_policy=ImportPolicy(engine.spec.vocab_size, engine.cfg.max_model_len - 1),
                     import_allowed=server.quotas.check_import,
                     session_deleted=server.sessions.drop,
                     session_imported=server.sessions.imported)


async def serve_view(space, view: ViewStatus, hooks=None, mounter: str | None = None,
                     notifier: SystemdNotifier | None = None, serving: str = "", *,
                     task_status=trio.TASK_STATUS_IGNORED) -> None:
    """The swapfs FUSE view, which must never take the service down: a mount that fails,
    is aborted too often or is unmounted from outside leaves the daemon serving (and the
    flash tier working) without its view; `view` says so in `kvmm stats`, the log has one
    line, and systemd's STATUS= (systemctl status) reads "degraded".

    With `mounter` (a socket of `kvmm view-mounter`) the mount is done by that privileged
    helper and only its fd is served here; otherwise libfuse mounts (root, development)."""
    from swapfs.fuse_mount import serve_fuse

    class _Started:
        done = False

        def started(self, value=None) -> None:
            self.done = True
            view.mounted()
            task_status.started()

    def failed(reason: str) -> None:
        view.failed(reason)
        log.error("swapfs view at %s is not mounted: %s; serving on without it",
                  view.mountpoint, reason)
        if notifier is not None and status.done:
            notifier.status(f"serving on {serving}" + view.degraded_note())

    mount_fd = None
    if mounter is not None:
        from kvmm_daemon.daemon.view_mounter import request_view_fd
        mount_fd = functools.partial(request_view_fd, mounter)
    status = _Started()
    try:
        await serve_fuse(space, view.mountpoint, allow_other=mounter is not None or os.geteuid() == 0,
                         task_status=status, mount_fd=mount_fd,
                         session_namer=lambda uid, name: f"{uid}:{name}",   # the server's session ids
                         hooks=hooks)
        if status.done:
            failed("unmounted from outside or aborted too often")
    except Exception as exc:
        log.debug("swapfs view failure", exc_info=True)
        failed(f"{type(exc).__name__}: {exc}")
    if not status.done:
        task_status.started()


class ViewStatus:
    """What became of the swapfs view, for `kvmm stats` and systemd's STATUS=.

    Attributes:
      mountpoint: where the view goes; None when there is no view (no swap tier or no mount).
      state: "off" (no view), "starting", "mounted" or "failed"; "failed" iff `reason` is set.
      reason: why the view is not mounted, one line naming the fix where known.
    """

    def __init__(self, mountpoint: str | None):
        self.mountpoint = mountpoint or None
        self.state = "starting" if self.mountpoint else "off"
        self.reason: str | None = None

    def mounted(self) -> None:
        self.state, self.reason = "mounted", None

    def failed(self, reason: str) -> None:
        self.state, self.reason = "failed", reason

    def degraded_note(self) -> str:
        return f"; degraded: swapfs view at {self.mountpoint} not mounted ({self.reason})" \
            if self.state == "failed" else ""

    def statistics(self) -> dict[str, Any]:
        return {"mountpoint": self.mountpoint, "state": self.state, "reason": self.reason}


def open_http_listeners(cfg: DaemonConfig, inherited: dict) -> list[Listener]:
    """The HTTP API's sockets: the Unix one (passed by systemd, else `http_socket` bound like
    the msgpack socket) and the TCP one of `http_listen`."""
    out = []
    if "http" in inherited or cfg.http_socket:
        out.append(open_listener(cfg.http_socket or "", gid=cfg.socket_gid(), mode=cfg.socket_mode,
                                 inherited=inherited, role="http"))
    if cfg.http_listen:
        host, port = cfg.http_address()
        try:
            sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                        backlog=128)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {cfg.http_listen} for HTTP: {exc.strerror}; "
                              f"choose another --http-listen") from None
        bound = sock.getsockname()
        if host not in ("127.0.0.1", "::1", "localhost"):
            log.warning("the HTTP API listens on %s, beyond loopback; anyone who can reach it "
                        "needs only an API key (no TLS: put a proxy in front)", host)
        out.append(Listener(sock, f"tcp {bound[0]}:{bound[1]}", activated=False))
    return out


def load_engine(cfg: DaemonConfig, notifier: SystemdNotifier) -> Any:
    from kvmm_daemon.engine.engine import Engine   # torch import: only the server needs it

    notifier.status("loading model")
    t0 = time.perf_counter()
    engine = Engine.from_config(cfg.engine)
    log.info("model %s loaded in %.1f s", cfg.engine.model or "(embedded SmolLM2-135M)",
             time.perf_counter() - t0)
    log.info("OpenMP runtime: %s", openmp_runtime.status()["reason"])
    return engine


def run_service(cfg: DaemonConfig) -> int:
    """`kvmm serve`: the whole life of the daemon; returns the exit status."""
    setup_logging(cfg.log_level)
    notifier = SystemdNotifier.from_env()
    try:
        engine = load_engine(cfg, notifier)
        inherited = inherited_sockets()
        listener = open_listener(cfg.socket, gid=cfg.socket_gid(), mode=cfg.socket_mode, inherited=inherited)
        http_listeners = open_http_listeners(cfg, inherited)
    except Exception:
        notifier.close()
        raise
    try:
        failure = serve_in_trio_thread(cfg, engine, listener, notifier, http_listeners)
        if failure is not None:
            log.critical("the daemon failed", exc_info=failure)
            return 1
    finally:
        listener.close()
        for lst in http_listeners:
            lst.close()
        notifier.close()
        engine.close()            # flushes the flash tier: sessions survive the restart
    return 0


def serve_in_trio_thread(cfg: DaemonConfig, engine: Any, listener: Listener, notifier: SystemdNotifier,
                         http_listeners: Sequence[Listener]) -> BaseException | None:
    """Run the trio loop in a thread and step the engine in this (the main) thread: an
    OpenMP team started from any other thread computes at about half speed here, which halved
    the daemon's decode against `kvmm run` (36 vs 74 tok/s at batch 1). SIGTERM/SIGINT are
    caught here (signal handlers run in the main thread) and forwarded to the loop. Returns
    the exception the daemon failed with, or None."""
    loops: queue.Queue = queue.Queue()
    box: dict[str, Any] = {}

    def on_signal(signum, _frame) -> None:
        box["signal"] = signal.Signals(signum).name
        if "stop" in box:
            box["stop"]()

    async def main() -> None:
        stop = trio.Event()
        token = trio.lowlevel.current_trio_token()

        def request_stop() -> None:
            token.run_sync_soon(stop.set)
        box["stop"] = request_stop
        if "signal" in box:
            request_stop()
        def hand_over(loop) -> None:
            box["loop"] = loop
            loops.put(loop)
        await serve_engine(cfg, engine, listener, notifier, http_listeners, on_loop=hand_over, stop=stop)

    def trio_thread() -> None:
        try:
            trio.run(main)
        except BaseException as exc:       # noqa: BLE001 - reported by the main thread
            box["failure"] = exc
        finally:
            if "loop" in box:
                box["loop"].stop()          # the main thread's stepping returns
            loops.put(None)                 # or it stops waiting for a loop

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    thread = threading.Thread(target=trio_thread, name="kvmm-trio")
    thread.start()
    try:
        loop = loops.get()
        if loop is not None:
            loop.engine_main()
    finally:
        thread.join()
        for s, h in previous.items():
            signal.signal(s, h)
    return box.get("failure")
