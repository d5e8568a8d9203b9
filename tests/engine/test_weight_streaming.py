"""Weights under a hard budget, streamed from flash through iosched: the same tokens as the
resident engine at every budget, the budget held, failures confined to their step."""
import logging
import os
import shutil
import tempfile

import pytest

from kvmm_daemon.engine.sampling_params import SamplingParams
from kvmm_daemon.errors import ConfigError
from kvmm_daemon.model.weight_file import weight_file_path, weight_key
from tests.engine.conftest import assert_no_leaks
from tests.engine.test_engine import PROMPT, greedy
from tests.model.tiny_gguf import write_tiny_gguf
from tests.model.tiny_llama import write_tiny_llama
from tests.swapfs.conftest import fuse_skip_reason, running_faultfs

needs_fuse = pytest.mark.skipif(fuse_skip_reason() is not None, reason=fuse_skip_reason() or "")


@pytest.fixture(scope="module")
def q4_model(tmp_path_factory):
    """SmolLM2's mix: Q4_1 layers, a tied Q8_0 table (so the LM head streams as Q8_0 blocks)."""
    d = tmp_path_factory.mktemp("tiny-q4")
    hf = write_tiny_llama(d / "hf", layers=8, hidden=128, heads=4, kv_heads=2, intermediate=256, vocab=320)
    return str(write_tiny_gguf(d / "tiny-q4.gguf", hf, weight_type="Q4_1",
                               types={"token_embd.weight": "Q8_0"}))


@pytest.fixture
def state_dir():
    d = tempfile.mkdtemp(prefix="kvmm-weights-", dir="/var/tmp")    # O_DIRECT needs a disk fs
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def resident(make_engine, q4_model):
    return greedy(make_engine(model=q4_model), PROMPT, n=16)


def _sizes(engine):
    pool = engine.runner.model.weights
    return pool, [r.nbytes for r in pool.wf.segments]


@pytest.mark.parametrize("fraction", [1.5, 0.5, 0.25, 0.0])
def test_every_budget_gives_the_resident_tokens(make_engine, q4_model, state_dir, resident, fraction):
    probe = make_engine(model=q4_model, weight_budget="64MiB", state_dir=state_dir)
    pool, sizes = _sizes(probe)
    probe.close()
    budget = max(int(sum(sizes) * fraction), 2 * max(sizes) + 128 * 1024)
    engine = make_engine(model=q4_model, weight_budget=budget, state_dir=state_dir)
    pool = engine.runner.model.weights
    stats = pool.statistics()
    assert stats.resident_bytes <= budget and stats.streaming
    assert greedy(engine, PROMPT, n=16) == resident
    for _ in range(2):                                  # prefill-only and decode steps alike
        assert greedy(engine, PROMPT[:5] + [1, 2, 3], n=4) == greedy(make_engine(model=q4_model), PROMPT[:5] + [1, 2, 3], n=4)
    stats = pool.statistics()
    if fraction < 1:
        assert stats.window >= 2 and stats.streamed_bytes_per_step > 0
        # a decode step reads the streamed segments once (plus its tokens' embedding pages)
        step = stats.last_step
        assert stats.streamed_bytes_per_step <= step["bytes_read"] <= stats.streamed_bytes_per_step + 64 * 1024
    else:
        assert stats.window == 0 and stats.last_step["bytes_read"] <= 16 * 4096
    assert_no_leaks(engine)
    engine.close()


def test_batched_requests_share_one_read_per_step(make_engine, q4_model, state_dir, resident):
    engine = make_engine(model=q4_model, weight_budget=300_000, state_dir=state_dir)
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    for i in range(4):
        engine.add_request(f"r{i}", PROMPT, params)
    got = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.error is None
            for d in out.deltas:
                got.setdefault(out.request_id, []).extend(d.token_ids)
    assert all(v == resident for v in got.values())
    stats = engine.runner.model.weights.statistics()
    assert stats.last_step["bytes_read"] <= stats.streamed_bytes_per_step + 64 * 1024
    engine.close()


def test_a_budget_below_the_window_is_refused_with_the_minimum(make_engine, q4_model, state_dir):
    with pytest.raises(ConfigError, match=r"raise --weight-budget to at least"):
        make_engine(model=q4_model, weight_budget=50_000, state_dir=state_dir)


def test_a_corrupt_weight_file_is_rebuilt(make_engine, q4_model, state_dir, resident, caplog):
    make_engine(model=q4_model, weight_budget=300_000, state_dir=state_dir).close()
    path = weight_file_path(state_dir, q4_model, weight_key(q4_model, "auto"))
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        f.write(b"\x5a" * 64)
    caplog.set_level(logging.WARNING, logger="kvmm.weights")
    engine = make_engine(model=q4_model, weight_budget=300_000, state_dir=state_dir)
    assert "rebuilding" in caplog.text and "checksum" in caplog.text
    assert greedy(engine, PROMPT, n=16) == resident
    engine.close()


def test_a_changed_model_gets_a_new_weight_file(make_engine, q4_model, state_dir, tmp_path):
    make_engine(model=q4_model, weight_budget=300_000, state_dir=state_dir).close()
    before = set(os.listdir(state_dir))
    other = shutil.copy(q4_model, tmp_path / "tiny-q4.gguf")
    with open(other, "r+b") as f:               # another model under the same name
        f.seek(-8, os.SEEK_END)
        f.write(b"\x01" * 8)
    make_engine(model=str(other), weight_budget=300_000, state_dir=state_dir).close()
    after = {n for n in os.listdir(state_dir) if n.endswith(".kvw")}
    assert len(after) == 1 and after.isdisjoint(before)


@needs_fuse
def test_a_failed_weight_read_fails_that_step_only(make_engine, q4_model, resident):
    with running_faultfs("kvmm-weights-faultfs-") as (mnt, fault):
        state = mnt
        make_engine(model=q4_model, weight_budget=300_000, state_dir=os.path.join(os.path.dirname(mnt), "back")).close()
        engine = make_engine(model=q4_model, weight_budget=300_000, state_dir=state)
        assert greedy(engine, PROMPT, n=4) == resident[:4]
        fault("read_eio", True)
        engine.add_request("bad", PROMPT, SamplingParams(max_tokens=8, ignore_eos=True))
        errors = []
        while engine.has_unfinished_requests():
            errors += [o.error for o in engine.step() if o.error]
        assert errors and "reading weights" in errors[0] and "failed" in errors[0]
        fault("read_eio", False)
        assert greedy(engine, PROMPT, n=16) == resident      # the next step reads again
        assert_no_leaks(engine)
        engine.close()


def test_step_trace_splits_each_step_into_compute_and_stall(make_engine, q4_model, state_dir):
    engine = make_engine(model=q4_model, weight_budget=300_000, state_dir=state_dir)
    greedy(engine, PROMPT, n=6)
    pool = engine.runner.model.weights
    steps = list(pool.trace.steps)
    assert len(steps) >= 5
    n = len(pool.wf.segments)
    for rec in steps[1:]:
        assert len(rec.stall_s) == len(rec.compute_s) == n
        assert all(c > 0 for c in rec.compute_s)                  # every segment computed on
        assert all(rec.stall_s[i] == 0 for i in pool.pinned)      # pinned ones never wait
        assert sum(rec.stall_s) + sum(rec.compute_s) <= rec.step_s
    engine.close()


def test_the_window_is_chosen_from_measured_times_and_logged(make_engine, q4_model, state_dir, caplog):
    caplog.set_level(logging.INFO, logger="kvmm.weights")
    engine = make_engine(model=q4_model, weight_budget=300_000, state_dir=state_dir)
    pool = engine.runner.model.weights
    assert pool.window_reason.startswith(("compute-bound", "I/O-bound", "default"))
    assert pool.plan.window >= 2 and f"window {pool.window_reason}" in caplog.text
    engine.close()
    fixed = make_engine(model=q4_model, weight_budget=300_000, state_dir=state_dir, weight_window=2)
    assert fixed.runner.model.weights.plan.window == 2
    fixed.close()


@pytest.mark.slow
def test_embedding_rows_read_in_several_rounds_equal_the_resident_table(state_dir):
    """300 scattered rows of the embedded model's 49k-row table need more pages than the
    scratch holds: read in rounds, they equal the resident embedding bit for bit."""
    import torch

    from iosched import IOScheduler
    from kvmm_daemon.model.model_file import default_model_path, open_model
    from kvmm_daemon.model.weight_segments import ModelWeights
    from kvmm_daemon.model.weight_store import open_streaming_pool

    path = default_model_path()
    mf = open_model(path)
    io = IOScheduler()
    pool = open_streaming_pool(mf, path, mf.spec, io, budget_bytes=22 << 20, configured_state=state_dir)
    try:
        ids = torch.randperm(mf.spec.vocab_size, generator=torch.Generator().manual_seed(0))[:300]
        ids = torch.cat([ids, ids[:7]])                                  # repeats too
        want = ModelWeights(mf, mf.spec).embedding()(ids)
        assert torch.equal(pool.embed(ids), want)
        assert pool.statistics().bytes_read >= 300 * 4096 > pool._scratch_bytes
    finally:
        pool.close()
        io.close()
