"""The engine loop's admission hold (EngineLoop._hold_for_arrivals) on a real daemon.

A closed-loop client sends its next request as soon as the last one finished; the step
after a finish waits (bounded by --admit-wait-ms) for that request, so it joins that step
instead of the one after. Another client's long stream keeps the engine busy meanwhile.
"""
from __future__ import annotations

import pytest
import trio

from kvmm_daemon.client import AsyncClient
from kvmm_daemon.daemon.daemon_config import DaemonConfig
from kvmm_daemon.errors import ConfigError

from .conftest import DaemonProcess
from .helpers import wait_idle


async def _closed_loop_beside_a_long_stream(path: str, turns: int) -> list[int]:
    done: list[int] = []

    async def long_stream():
        async with AsyncClient.connect(path) as c:
            async with c.stream("The long one", raw=True, max_tokens=200, ignore_eos=True) as s:
                done.append(sum([len(d.token_ids) async for d in s]))

    async def closed_loop():
        async with AsyncClient.connect(path) as c:
            for _ in range(turns):
                r = await c.generate("A short one", raw=True, max_tokens=4, ignore_eos=True)
                done.append(len(r.token_ids))

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(long_stream)
            await trio.sleep(0.2)                    # the long stream is decoding
            nursery.start_soon(closed_loop)
    return done


@pytest.mark.parametrize("wait_ms", [0, 1000])
def test_replacements_join_the_step_after_a_finish(tiny_model, wait_ms):
    d = DaemonProcess(tiny_model, args=["--admit-wait-ms", str(wait_ms)])
    try:
        done = trio.run(_closed_loop_beside_a_long_stream, d.socket, 3)
        assert sorted(done) == [4, 4, 4, 200]           # every request ran to its length
        loop = wait_idle(d.socket)["server"]["engine_loop"]
        if wait_ms == 0:
            assert loop["admit_waits"] == 0 and loop["admit_arrivals"] == 0
        else:
            # each of the first two short requests was replaced during the hold after it
            # finished; the third was not replaced, and its hold ended at the bound
            assert loop["admit_waits"] >= 3
            assert loop["admit_arrivals"] >= 2
            assert loop["admit_wait_s"] >= 1.0
    finally:
        d.stop_and_check()


@pytest.mark.parametrize("bad", [-1, float("nan"), "2", True])
def test_admit_wait_must_be_a_non_negative_number(bad):
    with pytest.raises(ConfigError, match="admit_wait_ms"):
        DaemonConfig(admit_wait_ms=bad)


async def _unreplaced_finishes(path: str) -> list[int]:
    """A long stream, and beside it requests that finish one step apart and are never
    replaced (an open-loop client: it sent them all at once)."""
    done: list[int] = []

    async def long_stream():
        async with AsyncClient.connect(path) as c:
            async with c.stream("The long one", raw=True, max_tokens=200, ignore_eos=True) as s:
                done.append(sum([len(d.token_ids) async for d in s]))

    async def one(n: int):
        async with AsyncClient.connect(path) as c:
            r = await c.generate("A short one", raw=True, max_tokens=n, ignore_eos=True)
            done.append(len(r.token_ids))

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(long_stream)
            await trio.sleep(0.2)
            for n in range(2, 30):
                nursery.start_soon(one, n)
    return done


def test_holds_stop_while_they_catch_nothing(tiny_model):
    d = DaemonProcess(tiny_model, args=["--admit-wait-ms", "100"])
    try:
        done = trio.run(_unreplaced_finishes, d.socket)
        assert sorted(done) == [*range(2, 30), 200]
        loop = wait_idle(d.socket)["server"]["engine_loop"]
        # after 8 holds that caught nothing, only every 8th finishing step holds (a probe)
        assert loop["admit_skipped"] >= 10
        assert loop["admit_waits"] <= 8 + (loop["admit_skipped"] + 7) // 7
    finally:
        d.stop_and_check()
