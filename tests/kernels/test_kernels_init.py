"""Backend choice of the public entry points (kernels/__init__.py), their results, and what
check_values=False skips."""
from __future__ import annotations

from types import ModuleType

import pytest
import torch

import kernels
from kernels import checks, cpu_native, reference, torch_paged

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


def _native_or_skip() -> None:
    built = cpu_native.extension()
    if not isinstance(built, ModuleType):
        pytest.skip(built)


def _set_kernel_env(monkeypatch, setting: str | None) -> None:
    if setting is None:
        monkeypatch.delenv(kernels.KERNEL_ENV, raising=False)
    else:
        monkeypatch.setenv(kernels.KERNEL_ENV, setting)


@pytest.mark.parametrize("setting", [None, "", "auto", "native", " Native "])
def test_cpu_tensors_use_the_native_path_when_built(monkeypatch, make_case, check_close, setting):
    _native_or_skip()
    _set_kernel_env(monkeypatch, setting)
    assert kernels.backend_for(torch.device("cpu")) == "native"
    calls = _spy(monkeypatch, cpu_native)
    case = make_case([9, 30], query_lens=[3, 2], seed=5)
    expected = reference.paged_attention_decode(case.q[:2], *case.decode_args[1:])
    decode, _ = _run_all(case)
    assert calls == list(ENTRY_POINTS)
    check_close(decode, expected)


@pytest.mark.parametrize("setting", ["torch", " Torch "])
def test_cpu_tensors_use_the_torch_path_when_told(monkeypatch, make_case, check_close, setting):
    _set_kernel_env(monkeypatch, setting)
    assert kernels.backend_for(torch.device("cpu")) == "torch"
    calls = _spy(monkeypatch, torch_paged)
    case = make_case([9, 30], query_lens=[3, 2], seed=5)
    expected = reference.paged_attention_prefill(*case.prefill_args)
    _, prefill = _run_all(case)
    assert calls == list(ENTRY_POINTS)
    check_close(prefill, expected)


def test_without_the_native_library_cpu_tensors_use_torch(monkeypatch, make_case):
    monkeypatch.setattr(cpu_native, "extension", lambda: "native CPU kernels not built (test)")
    monkeypatch.delenv(kernels.KERNEL_ENV, raising=False)
    assert kernels.backend_for(torch.device("cpu")) == "torch"
    monkeypatch.setenv(kernels.KERNEL_ENV, "native")
    with pytest.raises(ValueError, match=r"KVMM_KERNEL=native but .* \(native CPU kernels not "
                                         r"built \(test\)\); fix that or set KVMM_KERNEL=torch"):
        kernels.paged_attention_decode(*make_case([4]).decode_args)


def test_check_values_false_skips_the_value_checks(monkeypatch, make_case, check_close):
    monkeypatch.setenv(kernels.KERNEL_ENV, "torch")
    checked = []
    original = checks._check_block_values
    monkeypatch.setattr(checks, "_check_block_values",
                        lambda *a: checked.append(len(a[-1])) or original(*a))
    case = make_case([9, 30], query_lens=[3, 2], seed=5)
    expected = reference.paged_attention_prefill(*case.prefill_args)
    check_close(kernels.paged_attention_prefill(*case.prefill_args, check_values=False), expected)
    kernels.paged_attention_decode(case.q[:2], *case.decode_args[1:], check_values=False)
    assert checked == []
    kernels.paged_attention_prefill(*case.prefill_args)
    kernels.paged_attention_decode(case.q[:2], *case.decode_args[1:])
    assert checked == [2, 2]
    k = torch.randn(2, 2, 64)
    slots = torch.tensor([-2, 3])                  # unchecked, the torch path skips slot -2
    kernels.reshape_and_cache(k, k, case.k_cache, case.v_cache, slots, check_values=False)
    assert torch.equal(case.k_cache[0, 3], k[1])
    with pytest.raises(ValueError, match="holds -2"):
        kernels.reshape_and_cache(k, k, case.k_cache, case.v_cache, slots)


def test_native_path_refuses_bad_metadata_even_unchecked(monkeypatch, make_case):
    _native_or_skip()
    monkeypatch.setenv(kernels.KERNEL_ENV, "native")
    case = make_case([20, 7], num_heads=6, num_kv_heads=2, block_size=8)
    lens = torch.tensor([20, 9], dtype=torch.int32)      # sequence 1 reaches into a -1 column
    with pytest.raises(ValueError, match=r"block_tables\[1, 1\] = -1 lies inside"):
        kernels.paged_attention_decode(case.q[:2], case.k_cache, case.v_cache, case.block_tables,
                                       lens, case.scale, check_values=False)
    k = torch.randn(2, 2, 64)
    with pytest.raises(ValueError, match="holds 10000"):
        kernels.reshape_and_cache(k, k, case.k_cache, case.v_cache, torch.tensor([1, 10_000]),
                                  check_values=False)


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
