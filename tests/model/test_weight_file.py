"""The weight file: the forward's exact tensors, written atomically, checked on open."""
import os
import subprocess

import pytest
import torch

from kvmm_daemon.errors import ConfigError, WeightFileError
from kvmm_daemon.model import quant_linear as ql
from kvmm_daemon.model.model_file import open_model
from kvmm_daemon.model.weight_file import WeightFile, weight_file_path, weight_key, write_weight_file
from kvmm_daemon.model.weight_segments import ModelWeights, segment_from_parts, segment_parts
from kvmm_daemon.model.weight_store import prepare

from .tiny_gguf import write_tiny_gguf
from .tiny_llama import write_tiny_llama


@pytest.fixture(scope="module")
def tiny_q4(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    hf = write_tiny_llama(d / "hf", layers=5, hidden=64, intermediate=128, vocab=320)
    return write_tiny_gguf(d / "tiny-q4.gguf", hf, weight_type="Q4_1")


def _same(a, b):
    x = torch.randn(3, a.in_features if hasattr(a, "in_features") else 64)
    return torch.equal(a(x), b(x))


def test_segments_round_trip_through_parts(tiny_q4):
    mf = open_model(tiny_q4)
    mw = ModelWeights(mf, mf.spec)
    for sid, seg in mw.segments():
        meta, tensors = segment_parts(seg)
        copy = segment_from_parts(meta, {k: t.clone() for k, t in tensors.items()})
        if sid.kind == "layer":
            assert copy.qkv.mode == "int4"
            for name in ("qkv", "o", "gate_up", "down"):
                assert _same(getattr(seg, name), getattr(copy, name))
            assert torch.equal(seg.attn_norm, copy.attn_norm)
        else:
            assert _same(seg, copy)


@pytest.mark.parametrize("threads", [1, 2])
def test_chunked_lm_head_equals_the_whole_head_bit_for_bit(threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        mf = open_model(None)
        mw = ModelWeights(mf, mf.spec)
        whole, chunks = mw.lm_head_whole(), mw.lm_head()
        assert len(chunks) == mw.lm_head_chunks > 1
        for batch in (1, 3, 16, 33):
            x = torch.randn(batch, mf.spec.hidden_size) * 2
            assert torch.equal(whole(x), ql.lm_head_logits(x, chunks))
    finally:
        torch.set_num_threads(old)


def test_written_file_holds_the_forward_tensors(tiny_q4, tmp_path):
    mf = open_model(tiny_q4)
    wf = prepare(mf, tiny_q4, tmp_path, progress=False)
    assert wf.path.parent == tmp_path and wf.path.suffix == ".kvw"
    mw = ModelWeights(mf, mf.spec)
    with open(wf.path, "rb") as f:
        data = f.read()
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    for rec, (sid, seg) in zip(wf.segments, mw.segments()):
        assert rec.name == sid.name and rec.offset % 4096 == 0
        copy = segment_from_parts(rec.meta, rec.tensor_views(raw[rec.offset:rec.offset + rec.padded]))
        probe = copy if sid.kind == "lm_head" else copy.gate_up
        ref = seg if sid.kind == "lm_head" else seg.gate_up
        assert _same(probe, ref)
    # embedding rows: record r holds row r's parts
    emb = mw.embedding()
    e = wf.embedding
    rows = [3, 0, e.rows - 1]
    recs = torch.stack([raw[e.offset + r * e.record_bytes: e.offset + (r + 1) * e.record_bytes] for r in rows])
    parts = [recs[:, p.offset:p.offset + p.nbytes].contiguous().view(getattr(torch, p.dtype)).reshape(len(rows), *p.shape)
             for p in e.parts]
    table = ql.QuantEmbedding.from_row_parts(e.ggml_type, parts)
    assert torch.equal(table(torch.arange(3)), emb(torch.tensor(rows)))


def _q8_head_model(tmp_path):
    hf = write_tiny_llama(tmp_path / "hf", layers=2, hidden=64, intermediate=128, vocab=700)
    return write_tiny_gguf(tmp_path / "q8-head.gguf", hf, weight_type="Q4_1",
                           types={"token_embd.weight": "Q8_0"})


def test_a_q8_0_head_is_stored_and_held_as_its_blocks(tmp_path):
    model = _q8_head_model(tmp_path)
    mf = open_model(model)
    wf = prepare(mf, model, tmp_path, progress=False)
    mw = ModelWeights(mf, mf.spec)
    raw = torch.frombuffer(bytearray(wf.path.read_bytes()), dtype=torch.uint8)
    heads = 0
    for rec, (sid, seg) in zip(wf.segments, mw.segments()):
        assert rec.form is None and rec.memory_nbytes == rec.nbytes
        if sid.kind != "lm_head":
            continue
        heads += 1
        rows = seg.out_features
        assert seg.mode == "q8_0" and rec.nbytes == rows * 64 // 32 * 34
        copy = segment_from_parts(rec.meta, rec.tensor_views(raw[rec.offset:rec.offset + rec.padded]))
        assert torch.equal(copy.weight, seg.weight) and _same(copy, seg)
    assert heads == mw.lm_head_chunks >= 2
    assert wf.model_bytes == sum(r.nbytes for r in wf.segments)


def test_a_q8_0_head_asked_in_bfloat16_is_stored_as_its_blocks_and_expands(tmp_path):
    model = _q8_head_model(tmp_path)
    mf = open_model(model)
    wf = prepare(mf, model, tmp_path, linear_mode="bfloat16", progress=False)
    mw = ModelWeights(mf, mf.spec, linear_mode="bfloat16")
    raw = torch.frombuffer(bytearray(wf.path.read_bytes()), dtype=torch.uint8)
    heads = 0
    for rec, (sid, seg) in zip(wf.segments, mw.segments()):
        if sid.kind != "lm_head":
            assert rec.form is None and rec.memory_nbytes == rec.nbytes
            continue
        heads += 1
        rows = seg.out_features
        assert rec.form == "q8_0" and seg.mode == "bfloat16"
        assert rec.nbytes == rows * 64 // 32 * 34 and rec.memory_nbytes == rows * 64 * 2
        region = torch.zeros(rec.region_bytes, dtype=torch.uint8)
        region[:rec.padded] = raw[rec.offset:rec.offset + rec.padded]
        rec.expand(region)
        copy = segment_from_parts(rec.meta, rec.tensor_views(region))
        assert torch.equal(copy.weight.view(torch.int16), seg.weight.view(torch.int16))
    assert heads == mw.lm_head_chunks >= 2
    assert wf.model_bytes < wf.memory_bytes


def test_stale_and_corrupt_files_are_refused(tiny_q4, tmp_path):
    mf = open_model(tiny_q4)
    wf = prepare(mf, tiny_q4, tmp_path, progress=False)
    key = weight_key(tiny_q4, "auto")
    assert WeightFile.open(wf.path, key).segments == wf.segments
    with pytest.raises(WeightFileError, match="another model"):
        WeightFile.open(wf.path, dict(key, torch="0.0"))
    with open(wf.path, "r+b") as f:
        f.seek(30)
        f.write(b"\xff")
    with pytest.raises(WeightFileError, match="corrupt header"):
        WeightFile.open(wf.path, key)
    with open(wf.path, "r+b") as f:
        f.truncate(8192)
    with pytest.raises(WeightFileError):
        WeightFile.open(wf.path, key)


@pytest.fixture
def small_fs(tmp_path):
    """A real file system too small (and then read-only) for a weight file: a 64 KiB tmpfs."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_or_read_only_state_dir_is_a_clear_error_and_leaves_nothing(tiny_q4, small_fs):
    mf = open_model(tiny_q4)
    key = weight_key(tiny_q4, "auto")
    path = weight_file_path(small_fs, tiny_q4, key)
    with pytest.raises(ConfigError, match=r"free space in .* or point --state-dir elsewhere"):
        write_weight_file(ModelWeights(mf, mf.spec), path, key)
    assert list(path.parent.iterdir()) == []
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    with pytest.raises(ConfigError, match="writable"):
        write_weight_file(ModelWeights(mf, mf.spec), path, key)
    assert list(path.parent.iterdir()) == []
