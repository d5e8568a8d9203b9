"""Load: 64 concurrent clients with mixed requests, cancellations and abrupt disconnects
against one daemon whose KV pool (64 blocks) is small enough to force preemptions. Afterwards no block
is leaked, nothing runs or waits, and no well-behaved client saw an error."""
from __future__ import annotations

import random

import pytest
import trio

from kvmm_daemon.client import AsyncClient
from kvmm_daemon import protocol as P

from .conftest import DaemonProcess
from .helpers import wait_idle

CLIENTS = 64
PROMPTS = ["The quick brown fox", "Paged attention splits the KV cache", "def forward(self, x):",
           "A block table maps", "In 2024 the model had", "We'll see whether the scheduler"]


@pytest.fixture(scope="module")
def loaded(tiny_model):
    d = DaemonProcess(tiny_model, kv_budget="512KiB", env={"KVMM_MAX_REQUESTS_PER_UID": "256"})
    yield d
    d.stop_and_check()


async def well_behaved(path: str, rng: random.Random, errors: list, i: int) -> None:
    try:
        async with AsyncClient.connect(path) as c:
            kind = i % 4
            if kind == 0:
                r = await c.generate(rng.choice(PROMPTS), raw=True, max_tokens=rng.randint(4, 40), ignore_eos=True)
                assert r.finish_reason == "length" and r.usage["completion_tokens"] == len(r.token_ids)
            elif kind == 1:
                max_tokens = rng.randint(4, 40)
                async with c.stream(rng.choice(PROMPTS), raw=True, max_tokens=max_tokens, ignore_eos=True) as s:
                    n = sum([len(d.token_ids) async for d in s])
                assert n == max_tokens == len(s.result.token_ids)
            elif kind == 2:
                name = await c.open_session(f"load{i}")
                for turn in range(2):
                    r = await c.generate(rng.choice(PROMPTS), raw=True, session=name, max_tokens=8, ignore_eos=True)
                    assert r.usage["completion_tokens"] == 8
                await c.delete_session(name)
            else:
                r = await c.generate(messages=[{"role": "user", "content": rng.choice(PROMPTS)}],
                                     n=2, temperature=0.8, seed=i, max_tokens=12, ignore_eos=True)
                assert len(r.choices) == 2
    except Exception as exc:                        # noqa: BLE001 - collected and asserted below
        errors.append(f"client {i}: {type(exc).__name__}: {exc}")


async def canceller(path: str, rng: random.Random, i: int) -> None:
    async with AsyncClient.connect(path) as c:
        async with c.stream(rng.choice(PROMPTS), raw=True, max_tokens=300, ignore_eos=True) as s:
            got = 0
            async for _ in s:
                got += 1
                if got >= rng.randint(1, 5):
                    await s.cancel()
        assert s.result.finish_reason in ("abort", "length")


async def deserter(path: str, rng: random.Random, i: int) -> None:
    """Sends a request (and sometimes garbage), then vanishes without a word."""
    stream = await trio.open_unix_socket(path)
    await stream.send_all(P.encode_frame({"v": 1, "id": 1, "op": "generate", "prompt": rng.choice(PROMPTS),
                                          "raw": True, "params": {"max_tokens": 300, "ignore_eos": True}}))
    if i % 2:
        await stream.send_all(b"\x00\x00\x00\x09garbage")    # truncated frame
    await stream.receive_some(rng.randint(1, 200))
    await trio.sleep(rng.random() * 0.3)
    stream.socket.close()


def test_64_clients_mixed_load(loaded):
    errors: list[str] = []
    roles = {0: well_behaved, 1: well_behaved, 2: well_behaved, 3: well_behaved, 4: well_behaved,
             5: canceller, 6: canceller, 7: deserter}

    async def main():
        rng = random.Random(1234)
        with trio.fail_after(240):
            async with trio.open_nursery() as nursery:
                for i in range(CLIENTS):
                    fn = roles[i % 8]
                    extra = (errors,) if fn is well_behaved else ()
                    nursery.start_soon(fn, loaded.socket, random.Random(rng.random()), *extra, i)

    trio.run(main)
    assert errors == []
    s = wait_idle(loaded.socket)
    assert s["kv"]["blocks_allocated"] == 0, s["kv"]
    assert s["requests"]["running"] == 0 and s["requests"]["waiting"] == 0
    assert s["sessions"] == []
    assert s["clients"]["connected"] == 1
    assert s["server"]["requests_total"] >= CLIENTS
    assert s["server"]["limits"]["usage"] == []
