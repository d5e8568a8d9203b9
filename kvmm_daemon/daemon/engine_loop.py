"""EngineLoop: the engine stepping in a thread of its own while trio serves sockets.

`Engine.step()` is blocking compute, so it runs outside the event loop, in a thread that steps
for as long as there is work and sleeps on a condition variable when there is none. After each
step it hands the step's outputs to the trio loop in one call (`TrioToken.run_sync_soon`: one
wake-up of the event loop per step, however many requests the step served), so the loop routes
them to one memory channel per request and flushes sockets while the next step computes.
Requests enter through `submit` (which calls the thread-safe `Engine.add_request` at once, so a
request that can never be served fails immediately). The engine queues every mutation (add,
abort, session open/delete) and applies it at the start of its next step; `barrier()` waits for
that step, so a session operation is in effect when its reply goes out.

Why not `trio.to_thread.run_sync` per step: a worker per step costs a hand-off and a wake-up
each way, trio renames the worker on every job (two prctl calls), and the next step cannot
start until the loop has routed the last one. Which thread steps matters too: `kvmm serve`
steps the engine in the process's main thread and runs trio in another (service.py,
`serve_in_trio_thread`, `own_thread=False`), because torch's OpenMP parallel ops started from
any other thread ran at about half speed here (36 vs 72 tok/s at batch 1).

The loop pings the systemd watchdog after every step and, while the engine is idle, at least
every `ping_interval_s`: a step that hangs stops the pings, and systemd restarts the service.

Prior art: vLLM's AsyncLLMEngine (a background loop feeding per-request output queues) and
nano-vllm's `LLMEngine.step`.
"""
from __future__ import annotations

import logging
import math
import threading
from collections import deque
import time
from dataclasses import dataclass
from typing import Any, Callable

import trio

log = logging.getLogger("kvmm.engine_loop")

HOLD_WINDOW = 32        # holds remembered to judge whether holding pays
HOLD_MIN_CATCH = 0.25   # below this share of recent holds catching a request, holds stop...
HOLD_PROBE_EVERY = 8    # ...except every 8th, which notices when clients become closed loops


class Aborted:
    """Sentinel sent on a request's channel when it was aborted before finishing."""

    def __repr__(self) -> str:
        return "ABORTED"


ABORTED = Aborted()


@dataclass(frozen=True, slots=True)
class EngineLoopStatistics:
    steps: int
    busy_s: float              # wall time spent inside Engine.step
    in_flight: int             # requests submitted and not yet finished or aborted
    watchdog_pings: int
    admit_waits: int           # steps held back for the replacements of finished requests
    admit_wait_s: float        # wall time those holds took
    admit_arrivals: int        # requests that arrived during a hold (and so joined its step)
    admit_skipped: int         # holds skipped because recent ones caught nothing (open-loop clients)


class EngineLoop:
    """Owns the stepping of one engine.

    Attributes:
      engine: the Engine; only this loop's engine thread calls `step`.
      _streams: request id -> send channel; an entry exists iff the request was submitted and
        has neither finished (its final output was routed) nor been aborted. Trio side only.
      _cv: guards _work, _started, _idle and _stopping, shared with the engine thread.
      _work: something was queued (submit, abort, barrier) since the engine thread last looked.
      _settle: a barrier asked the next step to commit the deferred flash writes.
      _started: steps begun (engine thread); _done: steps whose outputs were routed (trio side);
        _done <= _started.
      _idle: the engine thread waits for work (no step in progress).
      _failure: the exception a step raised; the thread stops, `run` raises it.
      _arrivals: requests submitted since the last step's outputs were posted (under _cv).
      admit_wait_s: the longest a step is held back for replacements (see `_hold_for_arrivals`).
    """

    def __init__(self, engine: Any, *, watchdog: Callable[[], Any] = lambda: None,
                 ping_interval_s: float | None = None, own_thread: bool = True,
                 admit_wait_s: float = 0.0):
        if not admit_wait_s >= 0:
            raise ValueError(f"admit_wait_s must be >= 0, got {admit_wait_s!r}")
        self.engine = engine
        self.admit_wait_s = admit_wait_s
        self._arrivals = 0
        self._admit_waits = 0
        self._admit_wait_total = 0.0
        self._admit_arrivals = 0
        self._admit_skipped = 0
        self._declined = 0                  # holds judged not to pay (probes included)
        self._recent_holds: deque[bool] = deque(maxlen=HOLD_WINDOW)   # did each catch a request?
        self.own_thread = own_thread        # False: the caller's thread runs engine_main()
        self._token_ready = threading.Event()
        self._watchdog = watchdog
        self._idle_wait = ping_interval_s if ping_interval_s else math.inf
        self._streams: dict[str, trio.MemorySendChannel] = {}
        self._cv = threading.Condition()
        self._work = False
        self._settle = False
        self._started = 0
        self._idle = True
        self._stopping = False
        self._done = 0
        self._step_done = trio.Event()
        self._failed = trio.Event()
        self._failure: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._thread: threading.Thread | None = None
        self._busy = 0.0
        self._pings = 0

    def _kick(self, *, arrival: bool = False) -> None:
        with self._cv:
            self._work = True
            self._arrivals += arrival
            self._cv.notify()

    def submit(self, request_id: str, prompt_token_ids: list[int], params: Any,
               session_id: str | None = None, owner: int | None = None) -> trio.MemoryReceiveChannel:
        """Add a request to the engine; its outputs (then close) arrive on the returned channel.

        RequestError/CapacityError from the engine propagate to the caller unchanged."""
        assert request_id not in self._streams
        self.engine.add_request(request_id, prompt_token_ids, params, session_id=session_id, owner=owner)
        send, recv = trio.open_memory_channel(math.inf)
        self._streams[request_id] = send
        self._kick(arrival=True)
        return recv

    def abort(self, request_id: str) -> None:
        """Abort a request (idempotent); its channel gets ABORTED and closes."""
        send = self._streams.pop(request_id, None)
        self.engine.abort_request(request_id)
        self._kick()                        # one step applies the abort even when idle
        if send is not None:
            send.send_nowait(ABORTED)
            send.close()

    def in_flight(self) -> int:
        return len(self._streams)

    async def barrier(self, *, settle: bool = False) -> None:
        """Return once a step begun after this call has completed: every engine command
        queued before the call has then been applied. With `settle`, that step also commits
        every deferred flash write (Engine.settle_flash): a session turn is durable on flash
        when its final reply goes out."""
        with self._cv:
            want = self._started + 1
            self._work = True               # forces a step even when the engine is idle
            self._settle = self._settle or settle
            self._cv.notify()
        while self._done < want:
            if self._failure is not None:
                raise RuntimeError("the engine loop stopped") from self._failure
            await self._step_done.wait()

    def _ping(self) -> None:
        self._watchdog()
        self._pings += 1

    # --- the engine thread ----------------------------------------------------------------

    def engine_main(self) -> None:
        """Step until `run` ends (or a step raises). Runs in the engine thread, or, with
        own_thread=False, in the thread that calls it: the process's main thread, because
        an OpenMP team started from any other thread computes at about half speed here
        (torch's parallel ops: measured 2 threads 210 us vs 338 us for the same matmul)."""
        self._token_ready.wait()
        self._thread_main()

    def _hold_for_arrivals(self, finished: int) -> None:
        """After a step that finished `finished` requests, wait (under _cv) until as many
        requests have arrived since its outputs were posted, the engine is stopping, or
        `admit_wait_s` has passed.

        Why: most clients are closed loops: a client whose request just finished sends its
        next one a millisecond or two after the final reply, and an engine that began its
        next step at once would leave that request waiting a whole step more (measured at 8
        clients: TTFT p50 a step, ~27 ms, over in-process, where the replacement is added
        before the next step by construction). The hold is bounded and paid only on steps
        that finished something, and not at all while clients are not closed loops: when
        fewer than HOLD_MIN_CATCH of the last HOLD_WINDOW holds caught a request, only every
        HOLD_PROBE_EVERY-th is made (`_holding_pays`). `statistics()` reports the holds, their
        time, their catch and the skipped ones."""
        t0 = time.monotonic()
        deadline = t0 + self.admit_wait_s
        while self._arrivals < finished and not self._stopping:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._cv.wait(remaining)
        self._admit_waits += 1
        self._admit_wait_total += time.monotonic() - t0
        self._admit_arrivals += self._arrivals
        self._recent_holds.append(self._arrivals > 0)

    def _holding_pays(self) -> bool:
        recent = self._recent_holds
        if len(recent) < HOLD_PROBE_EVERY or sum(recent) >= HOLD_MIN_CATCH * len(recent):
            return True
        self._declined += 1
        if self._declined % HOLD_PROBE_EVERY == 0:
            return True                     # a probe
        self._admit_skipped += 1
        return False

    def _thread_main(self) -> None:
        engine = self.engine
        finished = 0
        while True:
            with self._cv:
                if finished and self.admit_wait_s and self._arrivals < finished and self._holding_pays():
                    self._hold_for_arrivals(finished)
                while not (self._stopping or self._work or engine.has_unfinished_requests()):
                    self._idle = True
                    self._cv.wait()
                if self._stopping:
                    self._idle = True
                    return
                self._work = False
                self._idle = False
                self._started += 1
                settle, self._settle = self._settle, False
            t0 = time.perf_counter()
            try:
                outputs = engine.step()
                if settle:
                    engine.settle_flash()
            except BaseException as exc:        # noqa: BLE001 - handed to `run`, which raises it
                self._post(self._fail, exc)
                return
            self._busy += time.perf_counter() - t0
            finished = sum(1 for out in outputs if out.finished)
            with self._cv:
                self._arrivals = 0          # before any client can see this step's replies
            if not self._post(self._route, outputs):
                return

    def _post(self, fn, arg) -> bool:
        """Hand `fn(arg)` to the trio loop; False once the loop has ended (shutdown raced
        the step in progress: its outputs have nobody to go to)."""
        try:
            self._token.run_sync_soon(fn, arg)
            return True
        except trio.RunFinishedError:
            return False

    # --- the trio side --------------------------------------------------------------------

    def _route(self, outputs: list) -> None:
        self._done += 1
        self._step_done.set()
        self._step_done = trio.Event()
        self._ping()
        for out in outputs:
            send = self._streams.get(out.request_id)
            if send is None:
                continue            # aborted meanwhile: its consumer is gone
            send.send_nowait(out)
            if out.finished:
                del self._streams[out.request_id]
                send.close()

    def _fail(self, exc: BaseException) -> None:
        self._failure = exc
        self._step_done.set()
        self._failed.set()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Start the engine thread; ping the watchdog while it is idle; on cancellation stop
        it (after the step in progress). A step that raised is raised here."""
        self._token = trio.lowlevel.current_trio_token()
        self._token_ready.set()
        if self.own_thread:
            self._thread = threading.Thread(target=self._thread_main, name="kvmm-engine", daemon=True)
            self._thread.start()
        task_status.started()
        self._ping()
        try:
            while True:
                with trio.move_on_after(self._idle_wait):
                    await self._failed.wait()
                if self._failure is not None:
                    exc = self._failure
                    self.fail_all(f"Engine.step raised {type(exc).__name__}: {exc}")
                    raise exc
                if self._idle:
                    self._ping()
        finally:
            self.stop()
            if self._thread is not None:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self._thread.join)

    def stop(self) -> None:
        """Ask the stepping loop to return after the step in progress (thread-safe)."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._token_ready.set()

    def fail_all(self, message: str) -> None:
        """Close every stream after a fatal engine error (consumers see a closed channel)."""
        for send in self._streams.values():
            send.close()
        self._streams.clear()
        log.error("engine loop stopped: %s", message)

    def statistics(self) -> EngineLoopStatistics:
        return EngineLoopStatistics(self._done, self._busy, len(self._streams), self._pings,
                                    self._admit_waits, self._admit_wait_total, self._admit_arrivals,
                                    self._admit_skipped)
