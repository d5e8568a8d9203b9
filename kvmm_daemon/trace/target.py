"""Which process `kvmm trace` watches: a given pid, the running daemon, or a command it starts.

The daemon is found by its command line: an argument naming kvmm (`kvmm`, `.../kvmm`,
`kvmm_daemon.cli`, ...) whose subcommand (next non-option argument) is `serve`. A command is started *gated*: the child
is a tiny Python program blocked on a pipe that execs the command only when `release()` is
called, so the probes are attached before the command's first instruction and its pid (kept
across exec) is known up front (strace -f and perf trace do the same with ptrace/fork).

Left out: following a daemon restarted under a new pid (trace ends when the target exits).
"""
from __future__ import annotations

import os
import subprocess
import sys

from kvmm_daemon.errors import KvmmError

_GATE = """
import os, sys
if os.read(int(sys.argv[1]), 1) != b"g":
    sys.exit(125)  # the tracer gave up before releasing the command
try:
    os.execvp(sys.argv[2], sys.argv[2:])
except OSError as exc:
    sys.exit(f"kvmm trace: cannot run {sys.argv[2]}: {exc.strerror}")
"""


def is_daemon_cmdline(argv: list[str]) -> bool:
    """True when `argv` runs `kvmm serve` (directly, through python -m or an entry point)."""
    for i, arg in enumerate(argv):
        base = os.path.basename(arg)
        if base == "kvmm" or base.startswith("kvmm_daemon"):
            sub = [a for a in argv[i + 1:] if not a.startswith("-")]
            return bool(sub) and sub[0] == "serve"
    return False


def daemon_socket(argv: list[str]) -> str | None:
    """The `--socket PATH` (or `--socket=PATH`) a daemon was started with, if any."""
    for i, arg in enumerate(argv):
        if arg == "--socket" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--socket="):
            return arg.split("=", 1)[1]
    return None


def read_cmdline(pid: int, proc: str = "/proc") -> list[str]:
    try:
        with open(f"{proc}/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def find_daemons(proc: str = "/proc") -> list[int]:
    """Pids of processes running `kvmm serve`, this process excluded."""
    me = os.getpid()
    pids = []
    for name in os.listdir(proc):
        if name.isdigit() and int(name) != me and is_daemon_cmdline(read_cmdline(int(name), proc)):
            pids.append(int(name))
    return sorted(pids)


def find_daemon() -> int:
    pids = find_daemons()
    if not pids:
        raise KvmmError("no kvmm daemon is running (no process runs `kvmm serve`); start one, give --pid PID, "
                        "or trace a command: kvmm trace -- kvmm run PROMPT")
    if len(pids) > 1:
        raise KvmmError(f"{len(pids)} kvmm daemons are running (pids {', '.join(map(str, pids))}); "
                        "pick one with --pid PID")
    return pids[0]


def check_pid(pid: int) -> None:
    if pid <= 0 or not os.path.exists(f"/proc/{pid}"):
        raise KvmmError(f"no process with pid {pid}; give the pid of a running process (see `pgrep -a kvmm`)")


def describe(pid: int) -> str:
    argv = read_cmdline(pid)
    return " ".join(argv)[:80] if argv else f"pid {pid}"


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


class GatedCommand:
    """A command started paused; `release()` lets it exec.

    Attributes:
      pid: the child's pid, the same before and after exec.
      proc: the Popen object; its return code is the command's exit status.
    Invariant: the gate pipe's write end is open until release() (or close()).
    """

    def __init__(self, argv: list[str]):
        if not argv:
            raise KvmmError("no command given after --; write e.g. kvmm trace -- kvmm run 'Hello'")
        read_fd, self._write_fd = os.pipe()
        try:
            self.proc = subprocess.Popen([sys.executable, "-c", _GATE, str(read_fd), *argv], pass_fds=(read_fd,))
        except OSError as exc:
            os.close(self._write_fd)
            raise KvmmError(f"cannot start {argv[0]}: {exc.strerror}") from None
        finally:
            os.close(read_fd)
        self.pid = self.proc.pid
        self.argv = list(argv)

    @property
    def released(self) -> bool:
        return self._write_fd is None

    def release(self) -> None:
        assert self._write_fd is not None, "released twice"
        os.write(self._write_fd, b"g")
        os.close(self._write_fd)
        self._write_fd = None

    def exited(self) -> bool:
        """True once the command has exited; it stays a zombie (readable in /proc) until wait()."""
        try:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        return info is not None

    def wait(self) -> int:
        return self.proc.wait()

    def close(self) -> int:
        """Release a gate never released (the child then exits at once), reap, return the status."""
        if self._write_fd is not None:
            os.close(self._write_fd)
            self._write_fd = None
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait()
