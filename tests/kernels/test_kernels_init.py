"""Backend choice of the public entry points (kernels/__init__.py) and their results."""
from __future__ import annotations

import pytest
import torch

import kernels
from kernels import reference, torch_paged

ENTRY_POINTS = ("paged_attention_decode", "paged_attention_prefill", "reshape_and_cache")


def _spy(monkeypatch, module) -> list[str]:
    """Records the names of module's entry points as they are called (and still runs them)."""
    calls: list[str] = []
    for name in ENTRY_POINTS:
        original = getattr(module, name)

        def spy(*args, _name=name, _original=original):
            calls.append(_name)
            return _original(*args)

        monkeypatch.setattr(module, name, spy)
    return calls


def _run_all(case) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode (first query of each sequence), prefill, and a KV write through kernels."""
    decode = kernels.paged_attention_decode(case.q[:2], *case.decode_args[1:])
    prefill = kernels.paged_attention_prefill(*case.prefill_args)
    k = torch.randn(2, 2, 64)
    kernels.reshape_and_cache(k, k, case.k_cache, case.v_cache, torch.tensor([-1, 3]))
    assert torch.equal(case.k_cache[0, 3], k[1])
    return decode, prefill


@pytest.mark.parametrize("setting", [None, "", "auto", "torch", " Torch "])
def test_cpu_tensors_use_the_torch_path_unless_told(monkeypatch, make_case, check_close, setting):
    if setting is None:
        monkeypatch.delenv(kernels.KERNEL_ENV, raising=False)
    else:
        monkeypatch.setenv(kernels.KERNEL_ENV, setting)
    assert kernels.backend_for(torch.device("cpu")) == "torch"
    calls = _spy(monkeypatch, torch_paged)
    case = make_case([9, 30], query_lens=[3, 2], seed=5)
    expected = reference.paged_attention_prefill(*case.prefill_args)
    _, prefill = _run_all(case)
    assert calls == list(ENTRY_POINTS)
    check_close(prefill, expected)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA tensors pick triton without asking")
def test_env_selects_triton_for_cpu_tensors(monkeypatch, make_case, check_close):
    try:
        from kernels import triton_paged
    except ImportError as err:
        pytest.skip(f"kernels.triton_paged does not import: {err}")
    monkeypatch.setenv(kernels.KERNEL_ENV, "triton")
    assert kernels.backend_for(torch.device("cpu")) == "triton"
    calls = _spy(monkeypatch, triton_paged)
    case = make_case([9, 30], query_lens=[3, 2], seed=5)
    expected = reference.paged_attention_decode(case.q[:2], *case.decode_args[1:])
    decode, _ = _run_all(case)
    assert calls == list(ENTRY_POINTS)
    check_close(decode, expected)


def test_unknown_setting_is_a_value_error(monkeypatch, make_case):
    monkeypatch.setenv(kernels.KERNEL_ENV, "cuda-graphs")
    with pytest.raises(ValueError, match="KVMM_KERNEL='cuda-graphs' is not one of"):
        kernels.paged_attention_decode(*make_case([4]).decode_args)
