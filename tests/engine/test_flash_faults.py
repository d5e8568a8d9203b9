"""Faults under the engine's flash tier (issue 4, faults): a full disk (ENOSPC) and I/O
errors (EIO) on swap writes and reads, a swap device that is gone (its FUSE connection
aborted) and a corrupted swapped-out slot. Requests carry on by recomputing, their outputs
equal a no-swap engine's, the error shows in `statistics().flash["errors"]` and in the
logs, and the engine keeps serving afterwards (with the tier working again once the fault
is gone).

EIO and ENOSPC come from faultfs (tests/swapfs/faultfs.py), a pass-through FUSE file
system that fails slot-file I/O on demand; the slot file is opened O_DIRECT and served
direct_io, so no page-cache retry hides a failure. Those tests need root and /dev/fuse;
the corrupt-slot test runs anywhere.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile

import pytest

from kvmm_daemon.engine.sampling_params import SamplingParams
from swapfs.slot_store import HEADER_BYTES, SUPER_BYTES, slot_stride
from swapfs.swap_space import SLOT_FILE
from tests.engine.conftest import assert_no_leaks
from tests.fusectl import abort_file
from tests.model.tiny_llama import write_sensitive_llama
from tests.engine.test_engine import PROMPT, greedy
from tests.swapfs.conftest import fuse_skip_reason, running_faultfs

needs_fuse = pytest.mark.skipif(fuse_skip_reason() is not None, reason=fuse_skip_reason() or "")
TOKENS = 30
TIGHT = dict(kv_budget=16 * 2048, max_model_len=56, swap_size="8MiB", preemption="swap")


@pytest.fixture
def faultfs():
    """(mountpoint, fault(kind, on)): kinds read_eio, write_eio, write_enospc."""
    with running_faultfs("kvmm-engine-faultfs-") as fs:
        yield fs


@pytest.fixture
def swap_dir():
    d = tempfile.mkdtemp(prefix="kvmm-faults-", dir="/var/tmp")   # O_DIRECT needs a real fs
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def sensitive_model(tmp_path_factory):
    return write_sensitive_llama(tmp_path_factory.mktemp("sensitive-llama"))


@pytest.fixture
def engine_of(make_engine, sensitive_model):
    """make_engine on the context-sensitive tiny model (wrong KV changes its output)."""
    return lambda **kw: make_engine(model=str(sensitive_model), **kw)


@pytest.fixture
def want(engine_of):
    """The greedy continuation of PROMPT by an engine without a flash tier."""
    return greedy(engine_of(), PROMPT, n=TOKENS)


def run_batch(engine, tag: str, *, on_step=None) -> dict[str, list[int]]:
    """Three concurrent PROMPT requests on a pool that holds about one: run to completion."""
    params = SamplingParams(max_tokens=TOKENS, ignore_eos=True)
    for i in range(3):
        engine.add_request(f"{tag}{i}", PROMPT, params)
    got: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.error is None, out.error
            for d in out.deltas:
                got.setdefault(out.request_id, []).extend(d.token_ids)
        if on_step is not None:
            on_step()
    assert len(got) == 3
    return got


def tier_warnings(caplog, what: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "kvmm.engine" and r.levelno == logging.WARNING and f"{what} failed" in r.getMessage()]


def swapfs_errors_logged(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "kvmm.swapfs" and r.levelno == logging.ERROR]


def assert_serves_again(engine, want, tag: str) -> None:
    """With the fault gone: outputs still right, and swapping works again."""
    before = engine.statistics().flash
    got = run_batch(engine, tag)
    assert all(v == want for v in got.values()), got
    after = engine.statistics().flash
    assert after["swap_preemptions"] > before["swap_preemptions"]
    assert after["swapped_in_tokens"] > before["swapped_in_tokens"]
    assert after["swap_slots"] == 0
    assert_no_leaks(engine)


@pytest.mark.fuse
@needs_fuse
@pytest.mark.parametrize("fault_kind, error_kind", [("write_eio", "eio"), ("write_enospc", "enospc")])
def test_swap_write_faults_fall_back_to_recompute(engine_of, faultfs, want, caplog, fault_kind, error_kind):
    mnt, fault = faultfs
    engine = engine_of(swap_dir=mnt, **TIGHT)
    assert engine.tier.swap.statistics().direct_io
    caplog.set_level(logging.WARNING)
    fault(fault_kind, True)
    got = run_batch(engine, "a")
    fault(fault_kind, False)
    assert all(v == want for v in got.values()), got
    flash = engine.statistics().flash
    assert flash["errors"].get(error_kind, 0) >= 1, flash
    assert flash["swapfs_errors"].get(error_kind, 0) >= 1, flash
    assert flash["swap_preemptions"] == 0 and flash["recompute_preemptions"] > 0
    assert flash["swap_slots"] == 0                       # failed writes leaked no slot
    assert tier_warnings(caplog, "swap-out") and swapfs_errors_logged(caplog)
    assert_serves_again(engine, want, "b")
    engine.close()


@pytest.mark.fuse
@needs_fuse
def test_swap_read_eio_recomputes_the_swapped_request(engine_of, faultfs, want, caplog):
    mnt, fault = faultfs
    engine = engine_of(swap_dir=mnt, **TIGHT)
    caplog.set_level(logging.WARNING)
    faulted = []

    def fail_reads_once_swapped() -> None:
        if engine.tier.swapped and not faulted:
            fault("read_eio", True)
            faulted.append(engine.statistics().flash["swap_preemptions"])

    got = run_batch(engine, "a", on_step=fail_reads_once_swapped)
    fault("read_eio", False)
    assert faulted, "nothing was swapped out: the pool is not tight enough"
    assert all(v == want for v in got.values()), got
    flash = engine.statistics().flash
    assert flash["errors"].get("eio", 0) >= 1, flash
    assert flash["swap_slots"] == 0                       # failed reads still freed their slots
    assert tier_warnings(caplog, "swap-in") and any("errno 5" in m for m in swapfs_errors_logged(caplog))
    assert_serves_again(engine, want, "b")
    engine.close()


@pytest.mark.fuse
@needs_fuse
def test_session_write_enospc_and_read_eio(engine_of, faultfs, caplog):
    """A write-through that hits ENOSPC leaves the turn in memory (the previous version stays
    on flash); after a restart a session whose blocks fail to read is recomputed."""
    mnt, fault = faultfs
    reference = engine_of()
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    caplog.set_level(logging.WARNING)
    e1 = engine_of(swap_dir=mnt, swap_size="8MiB")
    history: list[int] = []
    for turn, fault_kind in ((PROMPT, None), ([10, 11], "write_enospc"), ([12, 13, 14], None)):
        if fault_kind:
            fault(fault_kind, True)
        res = e1.generate(turn, params, session_id="chat")
        fault("write_enospc", False)
        assert res.choices[0].token_ids == greedy(reference, history + turn, n=6)
        history += turn + res.choices[0].token_ids
        assert e1.sessions["chat"].on_flash == (fault_kind is None)
    assert e1.statistics().flash["errors"].get("enospc", 0) >= 1
    assert tier_warnings(caplog, "session save")
    assert e1.tier.swap.session_info("chat").token_ids == tuple(history)   # the later save caught up
    e1.close()

    e2 = engine_of(swap_dir=mnt, swap_size="8MiB")
    fault("read_eio", True)
    res = e2.generate([15, 16], params, session_id="chat")
    fault("read_eio", False)
    assert res.choices[0].token_ids == greedy(reference, history + [15, 16], n=6)
    assert res.usage.cached_prompt_tokens == 0            # nothing came from flash
    assert e2.statistics().flash["errors"].get("eio", 0) >= 1
    assert tier_warnings(caplog, "session load")
    history += [15, 16] + res.choices[0].token_ids
    e2.close()
    e3 = engine_of(swap_dir=mnt, swap_size="8MiB")     # the recomputed turn was written through
    res = e3.generate([17], params, session_id="chat")
    assert res.usage.cached_prompt_tokens == len(history) - 1
    assert res.choices[0].token_ids == greedy(reference, history + [17], n=6)
    e3.close()


@pytest.mark.fuse
@needs_fuse
def test_swap_device_gone_mid_run(engine_of, faultfs, want, caplog):
    """The file system under --swap-dir dies (its FUSE connection aborted: every call fails
    with ENOTCONN): sessions and preempted requests are recomputed, the log gets one warning
    per kind of failure rather than one per step, and closing the tier does not raise."""
    mnt, _fault = faultfs
    reference = engine_of()
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    engine = engine_of(swap_dir=mnt, session_idle_s=0, **TIGHT)
    first = engine.generate(PROMPT, params, session_id="chat")
    assert engine.sessions["chat"].on_flash and engine.sessions["chat"].seq_id is None   # offloaded
    caplog.set_level(logging.WARNING)
    with open(abort_file(mnt), "w") as f:
        f.write("1")
    history = PROMPT + first.choices[0].token_ids
    res = engine.generate([7, 8], params, session_id="chat")
    assert res.choices[0].token_ids == greedy(reference, history + [7, 8], n=6)
    for tag in "ab":
        got = run_batch(engine, tag)
        assert all(v == want for v in got.values()), got
    flash = engine.statistics().flash
    assert flash["errors"].get("eio", 0) >= 4 and flash["swap_preemptions"] == 0, flash
    assert len(tier_warnings(caplog, "swap-out")) == 1          # rate-limited, counted in full
    assert tier_warnings(caplog, "session load") and tier_warnings(caplog, "session save")
    engine.tier.close()                                           # ENOTCONN from close() is not raised


def test_corrupt_swapped_slot_is_recomputed_not_served(engine_of, swap_dir, want, caplog):
    engine = engine_of(swap_dir=swap_dir, **TIGHT)
    caplog.set_level(logging.WARNING)
    stride = slot_stride(engine.runner.kv_cache.block_bytes)
    corrupted = []

    def corrupt_swapped_slots() -> None:
        if engine.tier.swapped and not corrupted:
            with open(os.path.join(swap_dir, SLOT_FILE), "r+b") as f:
                for entry in engine.tier.swapped.values():
                    for h in entry.handles:
                        f.seek(SUPER_BYTES + h.slot_id * stride + HEADER_BYTES + 40)
                        b = f.read(1)
                        f.seek(-1, os.SEEK_CUR)
                        f.write(bytes([b[0] ^ 0x5A]))
                        corrupted.append(h.slot_id)
                f.flush()
                os.fsync(f.fileno())

    got = run_batch(engine, "a", on_step=corrupt_swapped_slots)
    assert corrupted, "nothing was swapped out: the pool is not tight enough"
    assert all(v == want for v in got.values()), got
    flash = engine.statistics().flash
    assert flash["errors"].get("corrupt", 0) >= 1, flash
    assert flash["swap_slots"] == 0
    assert tier_warnings(caplog, "swap-in") and swapfs_errors_logged(caplog)
    assert_serves_again(engine, want, "b")
    engine.close()
