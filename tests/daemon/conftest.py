"""Fixtures for daemon tests: a tiny random-weight model and a real `kvmm serve` process."""
from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
KVMM = str(Path(sys.executable).with_name("kvmm"))


def _load_tiny_llama():
    spec = importlib.util.spec_from_file_location("kvmm_tests_tiny_llama", ROOT / "tests/model/tiny_llama.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.write_tiny_llama


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    # a fixed directory name: it is the model's id, which HTTP clients name (tests/http)
    return _load_tiny_llama()(tmp_path_factory.mktemp("daemon-model") / "tiny-llama", context=512)


@pytest.fixture(scope="session")
def slow_model(tmp_path_factory) -> Path:
    """Bigger than the tiny model so that a long request outlasts the signal handling."""
    return _load_tiny_llama()(tmp_path_factory.mktemp("daemon-slow-model") / "slow-llama", hidden=256, layers=6,
                              intermediate=768, context=512)


def short_tempdir() -> str:
    """A directory for sockets: short path (< 108 bytes) that other uids may traverse."""
    d = tempfile.mkdtemp(prefix="kvmm-", dir="/tmp")
    os.chmod(d, 0o755)
    return d


@pytest.fixture
def sock_dir():
    """A short_tempdir() removed after the test."""
    d = short_tempdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


class DaemonProcess:
    """`kvmm serve` as a child process; `stop()` sends SIGTERM and returns the exit status.
    `prefix` is prepended to the command line (a wrapper that sets up fds, say); `embedded`
    serves the embedded SmolLM2 instead of `model`; `http` also serves the HTTP API on
    `self.http_socket`. The daemon runs this tree's kvmm_daemon (PYTHONPATH), not whatever
    the venv's `kvmm` script would import."""

    def __init__(self, model: Path, *, args: list[str] = (), env: dict | None = None,
                 pass_fds: tuple[int, ...] = (), prefix: list[str] = (), socket: str | None = None,
                 kv_budget: str = "4MiB", wait: bool = True, embedded: bool = False, http: bool = False):
        self.dir = short_tempdir()
        self.socket = socket or os.path.join(self.dir, "kvmm.sock")
        self.http_socket = os.path.join(self.dir, "http.sock") if http else None
        if http:
            args = [*args, "--http-socket", self.http_socket]
        self.log_path = os.path.join(self.dir, "daemon.log")
        model_args = [] if embedded else ["--model", str(model)]
        cmd = [*prefix, KVMM, "serve", "--socket", self.socket, *model_args, "--kv-budget", kv_budget,
               "--threads", "1", "--log-level", "debug", *args]
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("KVMM_", "NOTIFY_", "LISTEN_", "WATCHDOG_"))}
        full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        full_env.update(env or {})
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=full_env,
                                     pass_fds=pass_fds)
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 120) -> None:
        from kvmm_daemon.client import Client, DaemonUnavailable

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with Client(self.socket, timeout=10) as c:
                    c.health()
                return
            except DaemonUnavailable:
                time.sleep(0.1)
        raise AssertionError(f"daemon not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return Path(self.log_path).read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"daemon did not stop on SIGTERM:\n{self.log()}")
        self._log.close()
        return code

    def stop_and_check(self) -> None:
        """Stop, clean up, and fail unless it exited 0 with no traceback in its log."""
        code = self.stop()
        log = self.log()
        self.cleanup()
        assert code == 0, log
        assert "Traceback" not in log, log

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def daemon(tiny_model):
    """One daemon on the tiny model shared by the tests that leave it idle and session-free."""
    d = DaemonProcess(tiny_model, args=["--socket-group", "nogroup"])
    yield d
    d.stop_and_check()
