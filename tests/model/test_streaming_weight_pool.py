"""The streaming pool's LM head against the resident one: the same logits, bit for bit, whether
its Q8_0 chunks are pinned or streamed, at every batch size and thread count: multiplied from
their blocks (q8_0, "auto"), natively or by torch, or expanded to bfloat16 (once when pinned,
in their slot after each read when streamed; natively or by torch)."""
import shutil
import tempfile

import pytest
import torch

from iosched import IOScheduler
from kernels import q8_0, q8_0_linear
from kvmm_daemon.model.model_file import open_model
from kvmm_daemon.model.weight_pool import ResidentWeightPool
from kvmm_daemon.model.weight_store import open_streaming_pool

from .tiny_gguf import write_tiny_gguf
from .tiny_llama import write_tiny_llama


@pytest.fixture(scope="module")
def q8_head_model(tmp_path_factory):
    """SmolLM2's mix at a tiny size: Q4_1 layers, a tied Q8_0 table of 5 head chunks."""
    d = tmp_path_factory.mktemp("tiny-q8-head")
    hf = write_tiny_llama(d / "hf", layers=6, hidden=128, heads=4, kv_heads=2, intermediate=256, vocab=1200)
    return str(write_tiny_gguf(d / "tiny.gguf", hf, weight_type="Q4_1", types={"token_embd.weight": "Q8_0"}))


@pytest.fixture
def state_dir():
    d = tempfile.mkdtemp(prefix="kvmm-q8head-", dir="/var/tmp")    # O_DIRECT needs a disk fs
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _logits_equal(pool, resident, hidden_size: int) -> None:
    for threads in (1, 2):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for batch in (1, 3, 16):
                x = torch.randn(batch, hidden_size, generator=torch.Generator().manual_seed(batch)) * 2
                for _ in range(2):                  # a second pass reads (and expands) again
                    assert torch.equal(pool.lm_head(x), resident.lm_head(x))
        finally:
            torch.set_num_threads(old)


def _pool(mf, path, io, budget, state_dir, linear_mode="auto"):
    return open_streaming_pool(mf, path, mf.spec, io, budget_bytes=budget, configured_state=state_dir,
                               linear_mode=linear_mode, window=2)


@pytest.mark.parametrize("linear_mode", ["auto", "int4"])   # int4: a bfloat16 head
def test_streamed_and_pinned_q8_0_chunks_give_the_resident_logits(q8_head_model, state_dir, linear_mode):
    mf = open_model(q8_head_model)
    resident = ResidentWeightPool(mf, mf.spec, linear_mode=linear_mode)
    io = IOScheduler()
    try:
        probe = _pool(mf, q8_head_model, io, 64 << 20, state_dir, linear_mode)
        records, fixed = probe.wf.segments, probe.plan.fixed_bytes
        probe.close()
        heads = [i for i, r in enumerate(records) if r.name.startswith("lm_head.")]
        if linear_mode == "auto":       # multiplied from the blocks: held as read
            assert len(heads) == 5 and all(records[i].form is None for i in heads)
            assert all(records[i].meta["linear"]["mode"] == "q8_0" for i in heads)
        else:
            assert len(heads) == 5 and all(records[i].form == "q8_0" for i in heads)
            assert all(records[i].nbytes * 64 == records[i].memory_nbytes * 34 for i in heads)
        sizes, memory = [r.nbytes for r in records], [r.region_bytes for r in records]
        layers = sum(memory) - sum(memory[i] for i in heads)
        window = 2 * max(memory) + fixed
        # some chunks pinned, some streamed: the layers pin first when chunks expand in memory
        middle = window + (sum(memory) // 2 if linear_mode == "auto" else layers + memory[heads[0]])
        seen = set()
        for budget in (window, middle, sum(memory) + fixed):
            pool = _pool(mf, q8_head_model, io, budget, state_dir, linear_mode)
            try:
                pinned_heads = {i for i in heads if i in pool.pinned}
                seen.add((bool(pinned_heads), len(pinned_heads) < len(heads)))
                _logits_equal(pool, resident, mf.spec.hidden_size)
                assert pool.statistics().resident_bytes <= budget
            finally:
                pool.close()
        assert (True, True) in seen and (False, True) in seen and (True, False) in seen
    finally:
        io.close()


def test_the_torch_expansion_serves_without_the_native_library(q8_head_model, state_dir, monkeypatch):
    mf = open_model(q8_head_model)
    resident = ResidentWeightPool(mf, mf.spec, linear_mode="int4")
    monkeypatch.setattr(q8_0, "extension", lambda: "not built (test)")
    io = IOScheduler()
    pool = _pool(mf, q8_head_model, io, 600_000, state_dir, "int4")
    try:
        assert any(pool.wf.segments[i].form == "q8_0" for i in pool.plan.streamed)
        _logits_equal(pool, resident, mf.spec.hidden_size)
    finally:
        pool.close()
        io.close()


def test_the_torch_q8_0_linear_serves_every_engine_alike_without_the_native_library(
        q8_head_model, state_dir, monkeypatch):
    mf = open_model(q8_head_model)
    resident = ResidentWeightPool(mf, mf.spec)
    monkeypatch.setattr(q8_0_linear, "extension", lambda: "not built (test)")
    io = IOScheduler()
    pool = _pool(mf, q8_head_model, io, 600_000, state_dir)
    try:
        heads = [i for i in pool.plan.streamed if pool.wf.segments[i].name.startswith("lm_head.")]
        assert heads and all(pool.wf.segments[i].form is None for i in heads)
        _logits_equal(pool, resident, mf.spec.hidden_size)
    finally:
        pool.close()
        io.close()


@pytest.mark.slow
@pytest.mark.parametrize("budget", [22 << 20, 110 << 20])
def test_the_embedded_model_head_streams_as_q8_0_with_the_resident_logits(state_dir, budget):
    """SmolLM2-135M's tied Q8_0 table: 28 chunks of ~1.1 MB on flash and in memory (q8_0). At
    22 MiB every chunk streams; at 110 MiB every layer and some chunks are pinned."""
    from kvmm_daemon.model.model_file import default_model_path

    path = default_model_path()
    mf = open_model(path)
    resident = ResidentWeightPool(mf, mf.spec)
    io = IOScheduler()
    pool = _pool(mf, path, io, budget, state_dir)
    try:
        head = [r for r in pool.wf.segments if r.name.startswith("lm_head.")]
        assert all(r.form is None and r.meta["linear"]["mode"] == "q8_0" for r in head)
        assert sum(r.nbytes for r in head) == 49152 * 576 // 32 * 34
        if budget > 100 << 20:
            assert all(i in pool.pinned for i in range(mf.spec.num_layers))
        _logits_equal(pool, resident, mf.spec.hidden_size)
    finally:
        pool.close()
        io.close()
