"""Driver of the engine's SIGKILL test (test_flash_crash.py): an engine with a flash tier on
a tiny model, under constant swap pressure, with sessions taking turns.

The workload (`run_workload`): four sessions keep one turn each in flight on a KV pool that
holds little more than one of them at full length, with preemption="swap" and
session_idle_s=0, so the engine keeps swapping blocks out and in, writing sessions through
after every turn, offloading them and flushing evicted prefix blocks (most of its time goes
to the flash tier, so a random kill usually lands inside a write). A session about to
outgrow the context is deleted and starts over. It stops by itself only after max_seconds
(a safety net for an orphan). Progress goes to a log file, one os.write per line (a line is
there after a SIGKILL iff it was written whole):
  ready                                           the engine is up
  C <sid> <swap_preemptions> <id,id,...>          the session's history is committed on flash
  D <sid>                                         about to delete the session
  X <sid>                                         the delete is committed
  E <traceback, one line>                         the workload failed (the test fails)

Importing torch takes seconds, so the test starts this module once as a fork server
(`serve`): it imports the engine, answers "ready", then for each stdin line
"run LOG SEED" forks a child that runs the workload (answer "pid N"), and for
"wait N" reaps child N (answer "reaped N STATUS"). The test SIGKILLs the child, never the
server; the parent imports torch but never computes, so the fork is safe.

Run: python crash_engine.py serve MODEL_DIR SWAP_DIR
     python crash_engine.py run MODEL_DIR SWAP_DIR LOG SEED      (one workload, in the foreground)
"""
from __future__ import annotations

import os
import random
import sys
import time
import traceback

from kvmm_daemon.engine_config import EngineConfig
from kvmm_daemon.engine.engine import Engine
from kvmm_daemon.engine.sampling_params import SamplingParams

SESSIONS = ("s0", "s1", "s2", "s3")
VOCAB = 320
BLOCK_SIZE = 4
BLOCK_BYTES = 2 * 2 * BLOCK_SIZE * 2 * 16 * 4      # the tiny model's KV block (float32)
MAX_MODEL_LEN = 128
TIGHT_BLOCKS = 38                  # one full-length session needs 32 + 4: two long ones never fit
SWAP_SIZE = "8MiB"
ROOM = 12                          # tokens a session keeps free for the test's check turn


def engine_config(model_dir: str, swap_dir: str | None, *, tight: bool) -> EngineConfig:
    """The driver's engine (tight) or the checker's (roomy); both see the same swap layout."""
    return EngineConfig(model=model_dir, kv_budget=(TIGHT_BLOCKS if tight else 1024) * BLOCK_BYTES,
                        block_size=BLOCK_SIZE, max_model_len=MAX_MODEL_LEN, threads=1,
                        max_num_batched_tokens=48, swap_dir=swap_dir, swap_size=SWAP_SIZE,
                        session_idle_s=0 if tight else 60.0, preemption="swap" if tight else "auto")


def _emit(fd: int, line: str) -> None:
    os.write(fd, (line + "\n").encode())


def _committed(engine: Engine, sid: str) -> bool:
    """True iff the flash store holds exactly the session's current history."""
    s = engine.sessions.get(sid)
    if s is None:
        return False
    try:
        info = engine.tier.swap.session_info(sid)
    except KeyError:
        return False
    return info.token_ids == tuple(s.token_ids)


def run_workload(model_dir: str, swap_dir: str, log_path: str, seed: int, max_seconds: float = 60.0) -> None:
    """Run until killed (or, as a safety net for an orphan, for max_seconds)."""
    deadline = time.monotonic() + max_seconds
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        engine = Engine.from_config(engine_config(model_dir, swap_dir, tight=True))
        rng = random.Random(seed)
        in_flight: dict[str, str] = {}           # request id -> session id
        turn = 0

        reported: dict[str, tuple] = {}          # session id -> history last reported committed

        def finish(outputs) -> None:
            for out in outputs:
                if out.error:
                    raise AssertionError(f"request {out.request_id} failed: {out.error}")
                if out.finished:
                    in_flight.pop(out.request_id)
            # write-through commits a step or more after the turn: report each commit seen
            for sid in SESSIONS:
                s = engine.sessions.get(sid)     # (a busy session's token_ids: its last turn)
                if s is None or reported.get(sid) == tuple(s.token_ids):
                    continue
                if _committed(engine, sid):
                    reported[sid] = tuple(s.token_ids)
                    flash = engine.statistics().flash
                    _emit(fd, f"C {sid} {flash['swap_preemptions']} {','.join(map(str, s.token_ids))}")

        _emit(fd, "ready")
        while time.monotonic() < deadline:
            for sid in SESSIONS:
                if sid in in_flight.values():
                    continue
                s = engine.sessions.get(sid)
                history = len(s.token_ids) if s is not None else 0
                prompt = [rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 10))]
                params = SamplingParams(max_tokens=rng.randint(4, 24), ignore_eos=True)
                if history + len(prompt) + params.max_tokens >= MAX_MODEL_LEN - ROOM:
                    _emit(fd, f"D {sid}")
                    engine.delete_session(sid)
                    reported.pop(sid, None)
                    finish(engine.step())
                    if engine.tier.has_session(sid):
                        raise AssertionError(f"session {sid} still on flash after its delete")
                    _emit(fd, f"X {sid}")
                turn += 1
                rid = f"t{seed}-{turn}"
                engine.add_request(rid, prompt, params, session_id=sid)
                in_flight[rid] = sid
            finish(engine.step())
    except BaseException:
        _emit(fd, "E " + traceback.format_exc().replace("\n", " | "))
        raise
    finally:
        os.close(fd)


def serve(model_dir: str, swap_dir: str) -> None:
    print("ready", flush=True)
    for line in sys.stdin:
        cmd, *rest = line.split()
        if cmd == "run":
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    run_workload(model_dir, swap_dir, rest[0], int(rest[1]))
                except BaseException:
                    code = 1
                finally:
                    os._exit(code)
            print(f"pid {pid}", flush=True)
        elif cmd == "wait":
            pid, status = os.waitpid(int(rest[0]), 0)
            print(f"reaped {pid} {status}", flush=True)
        else:
            print(f"error unknown command {cmd!r}", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], sys.argv[3])
    else:
        run_workload(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
