"""EngineLoop: the engine stepping in a worker thread while trio serves sockets.

`Engine.step()` is blocking compute, so it runs in `trio.to_thread.run_sync`; the event loop
stays free to accept clients, parse frames and stream tokens meanwhile. Requests enter through
`submit` (which calls the thread-safe `Engine.add_request` at once, so a request that can never
be served fails immediately) and leave as `RequestOutput`s routed to one memory channel per
request. The engine queues every mutation (add, abort, session open/delete) and applies it at
the start of its next step; `barrier()` waits for that step, so a session operation is in
effect when its reply goes out.

The loop pings the systemd watchdog after every step and, when idle, at least every
`ping_interval_s`: a step that hangs stops the pings, and systemd restarts the service.

Prior art: vLLM's AsyncLLMEngine (a background loop feeding per-request output queues) and
nano-vllm's `LLMEngine.step`. Left out: pipelining steps with output processing (one thread is
the engine's; the 2-core boards this targets have no spare core to overlap them).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import trio

log = logging.getLogger("kvmm.engine_loop")


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


class EngineLoop:
    """Owns the stepping of one engine.

    Attributes:
      engine: the Engine; only this loop's worker thread calls `step`.
      _streams: request id -> send channel; an entry exists iff the request was submitted and
        has neither finished (its final output was routed) nor been aborted.
      _wakeup: set when work may have arrived; replaced by a fresh event each time it is seen.
      _abort_pending: an abort was issued since the last step (so one step runs to apply it
        even if the engine reports no unfinished requests).
      _started / _done: steps begun / completed; _done <= _started <= _done + 1.
    """

    def __init__(self, engine: Any, *, watchdog: Callable[[], Any] = lambda: None,
                 ping_interval_s: float | None = None):
        self.engine = engine
        self._watchdog = watchdog
        self._idle_wait = ping_interval_s if ping_interval_s else math.inf
        self._limiter = trio.CapacityLimiter(1)
        self._streams: dict[str, trio.MemorySendChannel] = {}
        self._wakeup = trio.Event()
        self._abort_pending = False
        self._started = 0
        self._done = 0
        self._step_done = trio.Event()
        self._busy = 0.0
        self._pings = 0

    def submit(self, request_id: str, prompt_token_ids: list[int], params: Any,
               session_id: str | None = None, owner: int | None = None) -> trio.MemoryReceiveChannel:
        """Add a request to the engine; its outputs (then close) arrive on the returned channel.

        RequestError/CapacityError from the engine propagate to the caller unchanged."""
        assert request_id not in self._streams
        self.engine.add_request(request_id, prompt_token_ids, params, session_id=session_id, owner=owner)
        send, recv = trio.open_memory_channel(math.inf)
        self._streams[request_id] = send
        self._wakeup.set()
        return recv

    def abort(self, request_id: str) -> None:
        """Abort a request (idempotent); its channel gets ABORTED and closes."""
        send = self._streams.pop(request_id, None)
        self.engine.abort_request(request_id)
        self._abort_pending = True
        self._wakeup.set()
        if send is not None:
            send.send_nowait(ABORTED)
            send.close()

    def in_flight(self) -> int:
        return len(self._streams)

    async def barrier(self) -> None:
        """Return once a step begun after this call has completed: every engine command
        queued before the call has then been applied."""
        want = self._started + 1
        self._abort_pending = True          # forces a step even when the engine is idle
        self._wakeup.set()
        while self._done < want:
            await self._step_done.wait()

    def _ping(self) -> None:
        self._watchdog()
        self._pings += 1

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Step while there is work; sleep (pinging the watchdog) while there is none."""
        task_status.started()
        self._ping()
        while True:
            if not (self._abort_pending or self.engine.has_unfinished_requests()):
                with trio.move_on_after(self._idle_wait):
                    await self._wakeup.wait()
                self._wakeup = trio.Event()
                self._ping()
                continue
            self._abort_pending = False
            self._started += 1
            t0 = time.perf_counter()
            try:
                outputs = await trio.to_thread.run_sync(self.engine.step, limiter=self._limiter)
            except Exception as exc:
                self.fail_all(f"Engine.step raised {type(exc).__name__}: {exc}")
                raise
            self._busy += time.perf_counter() - t0
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
            await trio.sleep(0)         # let the streams flush before the next step

    def fail_all(self, message: str) -> None:
        """Close every stream after a fatal engine error (consumers see a closed channel)."""
        for send in self._streams.values():
            send.close()
        self._streams.clear()
        log.error("engine loop stopped: %s", message)

    def statistics(self) -> EngineLoopStatistics:
        return EngineLoopStatistics(self._done, self._busy, len(self._streams), self._pings)
