"""DaemonConfig: what `kvmm serve` needs beyond the engine, from TOML, environment and flags.

Sources, later ones winning: built-in defaults < the TOML file (`--config`, else $KVMM_CONFIG)
< environment variables `KVMM_<KEY>` (e.g. KVMM_SOCKET, KVMM_KV_BUDGET) < command-line flags.
The file has two tables, `[daemon]` (the fields of DaemonConfig) and `[engine]` (the fields of
`kvmm_daemon.engine_config.EngineConfig`); an unknown table or key is an error naming it, so a typo
never silently falls back to a default. Every error message names the key, where it came from
and what to write instead.

Prior art: nano-vllm's `Config` (one slots dataclass validated in `__post_init__`); systemd's
own precedence of unit file < drop-in < command line. Left out: reloading on SIGHUP (restart
the service instead; the prefix cache and sessions survive on flash once swapfs lands).
"""
from __future__ import annotations

import dataclasses
import grp
import logging
import math
import os
import tomllib
from dataclasses import dataclass, field
from typing import Any, Mapping

from kvmm_daemon.engine_config import EngineConfig
from kvmm_daemon.errors import ConfigError
from kvmm_daemon.protocol import DEFAULT_SOCKET
from kvmm_daemon.sizes import parse_size

DEFAULT_GROUP = "kvmm"
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(slots=True)
class DaemonConfig:
    """Settings of the service around one engine.

    Attributes (all validated in __post_init__):
      socket: path of the listening Unix socket (ignored under socket activation).
      socket_group: group that owns the socket (mode `socket_mode`); None leaves the creator's.
      grace_period_s: on SIGTERM, how long in-flight requests may run before being cancelled.
      admit_wait_ms: after a step that finished requests, how long the next step may wait for
        their clients' next requests (EngineLoop._hold_for_arrivals); 0 = never wait.
      max_frame_bytes: largest request frame accepted; a larger one closes that connection.
      max_clients: connections open at once; more are refused with limit_exceeded.
      max_requests_per_uid: generate requests in flight per client uid (root is not exempt).
      max_kv_blocks_per_uid: KV blocks one uid's in-flight requests may need at most, counted
        as ceil((prompt + max_tokens) / block_size) per choice; None = only the pool's size.
      max_sessions_per_uid: open sessions per uid.
      http_socket: path of the OpenAI-compatible HTTP API's Unix socket (same group and mode
        as `socket`; peers known by SO_PEERCRED); None = no HTTP on a Unix socket.
      http_listen: "HOST:PORT" (or "PORT" for 127.0.0.1) of the HTTP API on TCP; None = off.
        TCP peers must send `Authorization: Bearer KEY` with a key of `http_api_keys`.
      http_api_keys: API key -> tenant (a uid, or a user name resolved to its uid); a TCP
        request acts as that uid exactly as a Unix-socket peer of that uid would. In the
        environment: KVMM_HTTP_API_KEYS="key1=1000,key2=alice".
      view_mounter: Unix socket of the privileged view mounter (`kvmm view-mounter`,
        kvmm-view.socket) that mounts engine.mount and hands the daemon the /dev/fuse fd;
        None = the daemon mounts the view itself (as root, in development).
      engine: the EngineConfig handed to Engine.from_config.
    """

    socket: str = DEFAULT_SOCKET
    socket_group: str | None = DEFAULT_GROUP
    socket_mode: int = 0o660
    log_level: str = "info"
    grace_period_s: float = 30.0
    admit_wait_ms: float = 6.0
    max_frame_bytes: int = 1 << 20
    max_clients: int = 256
    max_requests_per_uid: int = 32
    max_kv_blocks_per_uid: int | None = None
    max_sessions_per_uid: int = 16
    http_socket: str | None = None
    http_listen: str | None = None
    http_api_keys: dict = field(default_factory=dict)
    view_mounter: str | None = None
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        _check_socket_path("socket", self.socket, DEFAULT_SOCKET)
        if self.socket_group == "":
            self.socket_group = None
        if self.socket_group is not None and not isinstance(self.socket_group, str):
            raise ConfigError(f"daemon.socket_group must be a group name, not {self.socket_group!r}")
        if not isinstance(self.socket_mode, int) or not 0 <= self.socket_mode <= 0o777:
            raise ConfigError(f"daemon.socket_mode {self.socket_mode!r} must be a permission "
                              f"mode like 0o660 (write 432 in TOML or \"0660\" in the environment)")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"daemon.log_level {self.log_level!r} must be one of "
                              f"{', '.join(LOG_LEVELS)}")
        self.grace_period_s = _non_negative("grace_period_s", self.grace_period_s, "seconds, e.g. 30")
        self.admit_wait_ms = _non_negative("admit_wait_ms", self.admit_wait_ms, "milliseconds, e.g. 2")
        self.max_frame_bytes = parse_size(self.max_frame_bytes, what="daemon.max_frame_bytes")
        if self.max_frame_bytes < 4096:
            raise ConfigError(f"daemon.max_frame_bytes {self.max_frame_bytes} is below 4096; "
                              f"a prompt would not fit, use e.g. 1MiB")
        for name in ("max_clients", "max_requests_per_uid", "max_sessions_per_uid"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"daemon.{name} {value!r} must be a positive integer")
        v = self.max_kv_blocks_per_uid
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ConfigError(f"daemon.max_kv_blocks_per_uid {v!r} must be a positive integer, "
                              f"or absent for no per-uid limit")
        self._check_http()
        if self.view_mounter == "":
            self.view_mounter = None
        if self.view_mounter is not None:
            _check_socket_path("view_mounter", self.view_mounter, "/run/kvmm/view.sock")
        if not isinstance(self.engine, EngineConfig):
            raise ConfigError("engine settings must come from the [engine] table")

    def _check_http(self) -> None:
        if self.http_socket == "":
            self.http_socket = None
        if self.http_socket is not None:
            _check_socket_path("http_socket", self.http_socket, "/run/kvmm/http.sock")
            if self.http_socket == self.socket:
                raise ConfigError(f"daemon.http_socket and daemon.socket are both {self.socket}; "
                                  f"give the HTTP API a socket of its own, e.g. /run/kvmm/http.sock")
        if self.http_listen == "":
            self.http_listen = None
        if self.http_listen is not None:
            self.http_address()                     # validates
        keys = self.http_api_keys
        if isinstance(keys, str):                   # KVMM_HTTP_API_KEYS="key=uid,key=name"
            pairs = [p.partition("=") for p in keys.split(",") if p.strip()]
            if any(not sep for _, sep, _ in pairs):
                raise ConfigError("KVMM_HTTP_API_KEYS must look like key1=1000,key2=alice")
            keys = {k.strip(): (int(v) if v.strip().isdigit() else v.strip()) for k, _, v in pairs}
        if not isinstance(keys, dict):
            raise ConfigError("daemon.http_api_keys must be a table of key = uid (or user name), "
                              "e.g. http_api_keys = { \"sk-board-1\" = 1000 }")
        for key, tenant in keys.items():
            if not isinstance(key, str) or len(key) < 8:
                raise ConfigError(f"daemon.http_api_keys: key {key!r} is shorter than 8 characters; "
                                  f"use a long random string (openssl rand -hex 16)")
            if isinstance(tenant, bool) or not isinstance(tenant, (int, str)) or (
                    isinstance(tenant, int) and not 0 <= tenant < 2 ** 32):
                raise ConfigError(f"daemon.http_api_keys: tenant {tenant!r} must be a uid or a user name")
        self.http_api_keys = keys
        if self.http_listen is not None and not keys:
            raise ConfigError("daemon.http_listen is set but daemon.http_api_keys is empty: TCP "
                              "peers have no uid, so every request would be refused; add keys "
                              "or listen on http_socket only")

    def http_address(self) -> tuple[str, int]:
        """(host, port) of http_listen; a bare port means loopback."""
        host, sep, port = str(self.http_listen).rpartition(":")
        host = host.strip("[]") if sep else "127.0.0.1"
        if not port.isdigit() or not 0 <= int(port) <= 65535 or (sep and not host):
            raise ConfigError(f"daemon.http_listen {self.http_listen!r} must be HOST:PORT or PORT, "
                              f"e.g. 127.0.0.1:8080 (0 picks a free port)")
        return host, int(port)

    def api_key_uids(self) -> dict[str, int]:
        """http_api_keys with user names resolved to uids; ConfigError for an unknown user."""
        import pwd

        out = {}
        for key, tenant in self.http_api_keys.items():
            if isinstance(tenant, str):
                try:
                    tenant = pwd.getpwnam(tenant).pw_uid
                except KeyError:
                    raise ConfigError(f"daemon.http_api_keys maps a key to user {tenant!r}, which "
                                      f"does not exist; use a uid or create the user") from None
            out[key] = tenant
        return out

    def socket_gid(self) -> int | None:
        """The gid of socket_group, or None to keep the creator's group."""
        if self.socket_group is None:
            return None
        try:
            return grp.getgrnam(self.socket_group).gr_gid
        except KeyError:
            if self.socket_group == DEFAULT_GROUP:
                logging.getLogger("kvmm.config").warning(
                    "group %s does not exist; the socket keeps the daemon's group (create it "
                    "with systemd-sysusers systemd/kvmm-sysusers.conf)", DEFAULT_GROUP)
                return None
            raise ConfigError(f"daemon.socket_group {self.socket_group!r} does not exist; create "
                              f"it (systemd-sysusers systemd/kvmm-sysusers.conf) or set "
                              f"socket_group = \"\" to keep root's group") from None

    @classmethod
    def load(cls, path: str | None = None, *, env: Mapping[str, str] | None = None,
             flags: Mapping[str, Any] | None = None) -> DaemonConfig:
        """Merge defaults, the TOML file, KVMM_* variables and flags (None values ignored)."""
        env = os.environ if env is None else env
        daemon_keys = {f.name for f in dataclasses.fields(cls)} - {"engine"}
        engine_keys = {f.name for f in dataclasses.fields(EngineConfig)}
        types = {f.name: str(f.type) for f in (*dataclasses.fields(cls), *dataclasses.fields(EngineConfig))}
        daemon: dict[str, tuple[Any, str]] = {}
        engine: dict[str, tuple[Any, str]] = {}
        path = path or env.get("KVMM_CONFIG") or None
        if path:
            for table, key, value in _read_toml(path, daemon_keys, engine_keys):
                (daemon if table == "daemon" else engine)[key] = (value, f"{path} [{table}] {key}")
        for key in sorted(daemon_keys | engine_keys):
            var = "KVMM_" + key.upper()
            if env.get(var, "") != "":
                target = daemon if key in daemon_keys else engine
                target[key] = (_from_env(env[var], key, types[key]), var)
        for key, value in (flags or {}).items():
            if value is None:
                continue
            if key not in daemon_keys | engine_keys:
                raise ConfigError(f"--{key.replace('_', '-')} is not supported by this engine "
                                  f"build (no EngineConfig.{key}); drop the flag")
            target = daemon if key in daemon_keys else engine
            target[key] = (value, "--" + key.replace("_", "-"))
        try:
            engine_cfg = EngineConfig(**{k: v for k, (v, _) in engine.items()})
        except ConfigError as exc:
            raise ConfigError(f"{exc} (engine settings from {_where(engine)})") from None
        except TypeError as exc:
            raise ConfigError(f"engine setting has the wrong type: {exc} (from {_where(engine)})") from None
        try:
            return cls(engine=engine_cfg, **{k: v for k, (v, _) in daemon.items()})
        except ConfigError as exc:
            raise ConfigError(f"{exc} (daemon settings from {_where(daemon)})") from None


def _check_socket_path(key: str, path: Any, example: str) -> None:
    if not isinstance(path, str) or not path.startswith("/"):
        raise ConfigError(f"daemon.{key} {path!r} must be an absolute path, e.g. {example}")
    if len(os.fsencode(path)) > 107:
        raise ConfigError(f"daemon.{key} {path!r} is longer than the 107 bytes a Unix socket "
                          f"path may have; choose a shorter path")


def _where(values: dict[str, tuple[Any, str]]) -> str:
    return ", ".join(src for _, src in values.values()) or "defaults"


def _read_toml(path: str, daemon_keys: set[str], engine_keys: set[str]):
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; fix --config or $KVMM_CONFIG") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    known = {"daemon": daemon_keys, "engine": engine_keys}
    for table, values in doc.items():
        if table not in known or not isinstance(values, dict):
            raise ConfigError(f"{path}: unknown top-level key {table!r}; use the tables "
                              f"[daemon] and [engine]")
        for key, value in values.items():
            if key not in known[table]:
                raise ConfigError(f"{path}: unknown key {key!r} in [{table}]; known keys: "
                                  f"{', '.join(sorted(known[table]))}")
            yield table, key, value


def _from_env(text: str, key: str, type_: str) -> Any:
    """An environment string as the type the key wants; sizes and names stay strings."""
    if key == "socket_mode":
        try:
            return int(text, 8)
        except ValueError:
            raise ConfigError(f"KVMM_SOCKET_MODE {text!r} must be an octal mode like 0660") from None
    if text.lower() in ("none", "null") and "None" in type_:
        return None
    if "str" in type_:
        return text
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def _non_negative(name: str, value, example: str) -> float:
    """`value` as a float, or ConfigError naming daemon.<name> and an example."""
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or value < 0):
        raise ConfigError(f"daemon.{name} {value!r} must be a non-negative number of {example}")
    return float(value)
