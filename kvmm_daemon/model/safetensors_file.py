"""SafetensorsModelFile: a Hugging Face Llama directory seen through GGUF names.

A directory with config.json, model.safetensors (or shards listed in
model.safetensors.index.json) and tokenizer.json becomes the same ModelSpec + QuantTensor
+ Tokenizer interface as a GGUF file: tensors are renamed to their GGUF names and Q/K
projections get llama.cpp's permutation (convert_hf_to_gguf.py LlamaModel.permute: rows
regrouped per head from [first half | second half] to interleaved pairs), so the forward
pass applies RoPE to adjacent pairs (x[2i], x[2i+1]) whatever the source. Shards are
parsed directly (8-byte header length + JSON header) and mapped read-only, so untouched
tensors are numpy views of the file. A Llama 3 "llama3" rope_scaling becomes the
rope_freqs.weight tensor llama.cpp would have written.

Left out: quantized checkpoints (GPTQ/AWQ/bitsandbytes), biases, rope scaling other than
llama3, non-Llama model types.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import mmap
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np

from kvmm_daemon.errors import ModelLoadError
from kvmm_daemon.model.chat_template import ChatTemplate
from kvmm_daemon.model.hf_tokenizer import load_hf_chat_template, load_hf_tokenizer, read_json
from kvmm_daemon.model.quant_tensor import QuantTensor
from kvmm_daemon.model.spec import ModelSpec
from kvmm_daemon.model.tokenizer import Tokenizer

_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2"}
_GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight",
                 "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight"}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")
_SAMPLE = 4096


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row permutation: within each head, rows [0..D/2) and [D/2..D)
    become the even and odd rows, so rotate-half RoPE turns into adjacent-pair RoPE."""
    rows = w.shape[0]
    assert rows % (2 * n_head) == 0, (w.shape, n_head)
    return np.ascontiguousarray(
        w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2)
    ).reshape(w.shape)


def llama3_rope_factors(head_dim: int, theta: float, scaling: dict[str, Any]) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1 rope scaling (rope_freqs.weight in GGUF)."""
    factor = float(scaling.get("factor", 8.0))
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


class _Shard:
    """One mapped .safetensors file: entries[name] = (dtype, shape, absolute offset, nbytes)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with open(path, "rb") as f:
                self.buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            (n,) = struct.unpack_from("<Q", self.buffer, 0)
            self.header_bytes = bytes(self.buffer[8:8 + n])
            header = read_header(self.header_bytes)
        except (OSError, ValueError, struct.error) as exc:
            raise ModelLoadError(f"{path} is not a readable safetensors file ({exc}); "
                                 "re-download the model") from None
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            if name == "__metadata__":
                continue
            begin, end = e["data_offsets"]
            if 8 + n + end > len(self.buffer):
                raise ModelLoadError(f"{path} is truncated (tensor {name!r} ends past the "
                                     "end of the file); re-download the model")
            self.entries[name] = (e["dtype"], tuple(e["shape"]), 8 + n + begin, end - begin)


def read_header(raw: bytes) -> dict[str, Any]:
    """The JSON header of a safetensors file."""
    header = json.loads(raw)
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return header


class SafetensorsModelFile:
    """A Hugging Face Llama model directory.

    Attributes: path (the directory), config (config.json), metadata (alias of config),
    spec. Invariant: _names maps every exposed GGUF name to (shard, HF name), or to None
    for computed tensors (rope_freqs.weight); spec.tensor_shapes() is a subset of it.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        cfg_path = self.path / "config.json"
        if not cfg_path.is_file():
            raise ModelLoadError(f"{self.path} has no config.json; pass --model PATH to a "
                                 "GGUF file or a Hugging Face safetensors directory")
        self.config: dict[str, Any] = read_json(cfg_path)
        self.metadata = self.config
        model_type = self.config.get("model_type")
        if model_type != "llama":
            raise ModelLoadError(f"{self.path}: model_type {model_type!r} is not supported "
                                 "(supported: llama); use a Llama-family model")
        self._shards = [_Shard(p) for p in self._shard_paths()]
        self._names: dict[str, tuple[_Shard, str] | None] = {}
        for shard in self._shards:
            for hf_name, (dtype, _, _, _) in shard.entries.items():
                gguf_name = self._gguf_name(hf_name)
                if gguf_name is None:
                    continue
                if dtype not in _DTYPES:
                    raise ModelLoadError(
                        f"{shard.path}: tensor {hf_name!r} has dtype {dtype} (supported: "
                        f"{', '.join(_DTYPES)}); quantized checkpoints are not supported, "
                        "use the float model or a GGUF")
                self._names[gguf_name] = (shard, hf_name)
        self._rope_scaling = self._check_config()
        if "output.weight" in self._names and self.config.get("tie_word_embeddings"):
            del self._names["output.weight"]
        if self._rope_scaling is not None:
            self._names["rope_freqs.weight"] = None
        self._tokenizer: Tokenizer | None = None
        self._tokenizer_error: ModelLoadError | None = None
        self.spec = self._build_spec()
        self._check_tensors()

    def _shard_paths(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(read_json(index).get("weight_map", {}).values()))
            paths = [self.path / f for f in files]
        elif (self.path / "model.safetensors").is_file():
            paths = [self.path / "model.safetensors"]
        else:
            paths = sorted(self.path.glob("*.safetensors"))
        missing = [p.name for p in paths if not p.is_file()]
        if not paths or missing:
            raise ModelLoadError(f"{self.path} has no model.safetensors"
                                 f"{' (missing: ' + ', '.join(missing) + ')' if missing else ''}"
                                 "; pass --model PATH to a GGUF file or a safetensors directory")
        return paths

    @staticmethod
    def _gguf_name(hf_name: str) -> str | None:
        if hf_name in _GLOBAL_NAMES:
            return _GLOBAL_NAMES[hf_name]
        m = _LAYER_RE.fullmatch(hf_name)
        if m and m.group(2) in _LAYER_NAMES:
            return f"blk.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
        if hf_name.endswith(".bias"):
            raise ModelLoadError(f"tensor {hf_name!r}: models with biases are not supported "
                                 "(Llama has none); use a Llama-family model")
        return None  # e.g. rotary_emb.inv_freq buffers: recomputed, not needed

    def _check_config(self) -> dict[str, Any] | None:
        cfg = self.config
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise ModelLoadError(f"{self.path}: attention/mlp biases are not supported")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ModelLoadError(f"{self.path}: hidden_act {cfg.get('hidden_act')!r} is not "
                                 "supported (Llama uses silu)")
        scaling = cfg.get("rope_scaling")
        kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        if kind == "default":
            return None
        if kind != "llama3":
            raise ModelLoadError(f"{self.path}: rope_scaling {kind!r} is not supported "
                                 "(supported: none, llama3)")
        return scaling

    def _build_spec(self) -> ModelSpec:
        cfg = self.config

        def need(key: str) -> int:
            if not isinstance(cfg.get(key), int):
                raise ModelLoadError(f"{self.path / 'config.json'}: {key!r} is missing or "
                                     "not an integer; fix config.json")
            return cfg[key]

        if "token_embd.weight" not in self._names:
            raise ModelLoadError(f"{self.path} lacks tensor 'model.embed_tokens.weight'; "
                                 "the checkpoint is incomplete")
        shard, hf = self._names["token_embd.weight"]
        vocab = shard.entries[hf][1][0]
        hidden, heads = need("hidden_size"), need("num_attention_heads")
        head_dim = cfg.get("head_dim") or hidden // heads
        try:
            tok = self.tokenizer
            bos, eos = tok.bos_token_id, tok.eos_token_id
        except ModelLoadError:  # reported again when .tokenizer is used
            bos = cfg.get("bos_token_id") if isinstance(cfg.get("bos_token_id"), int) else None
            eos = cfg.get("eos_token_id")
            eos = eos[0] if isinstance(eos, list) and eos else eos
            eos = eos if isinstance(eos, int) else None
        return ModelSpec(
            arch="llama", name=str(cfg.get("_name_or_path") or self.path.name),
            vocab_size=vocab, hidden_size=hidden, intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"), num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads, head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(cfg.get("rope_theta", 10000.0)), rope_dim=head_dim,
            context_length=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings="output.weight" not in self._names,
            bos_token_id=bos if bos is not None and 0 <= bos < vocab else None,
            eos_token_id=eos if eos is not None and 0 <= eos < vocab else None,
            model_id=self._model_id())

    def _model_id(self) -> str:
        h = hashlib.sha256(b"kvmm-hf-llama-v1\0")
        h.update((self.path / "config.json").read_bytes())
        for shard in self._shards:
            h.update(shard.header_bytes)
            for _, _, offset, nbytes in sorted(shard.entries.values(), key=lambda e: e[2]):
                end = offset + nbytes
                for a in sorted({offset, max(offset, (offset + end - _SAMPLE) // 2),
                                 max(offset, end - _SAMPLE)}):
                    h.update(shard.buffer[a:min(a + _SAMPLE, end)])
        return "sha256:" + h.hexdigest()

    def _check_tensors(self) -> None:
        expected = self.spec.tensor_shapes()
        missing = [n for n in expected if n not in self._names]
        if missing:
            raise ModelLoadError(f"{self.path} lacks tensor(s) {', '.join(missing[:4])}"
                                 f"{' and more' if len(missing) > 4 else ''}; the checkpoint "
                                 "is incomplete or not a Llama model")
        for name, shape in expected.items():
            shard, hf = self._names[name]
            got = shard.entries[hf][1]
            if got != shape:
                raise ModelLoadError(f"{shard.path}: tensor {hf!r} has shape {list(got)}, but "
                                     f"config.json implies {list(shape)}; fix config.json")

    # -- tensors ------------------------------------------------------------------------
    def tensor_names(self) -> list[str]:
        return list(self._names)

    def has_tensor(self, name: str) -> bool:
        return name in self._names

    def tensor(self, name: str) -> QuantTensor:
        """The named tensor (GGUF name); Q/K come permuted (a copy), others are views."""
        if name not in self._names:
            raise ModelLoadError(f"{self.path} has no tensor {name!r}")
        entry = self._names[name]
        if entry is None:
            factors = llama3_rope_factors(self.spec.head_dim, self.spec.rope_theta,
                                          self._rope_scaling)
            return QuantTensor(name, "F32", factors.shape, factors)
        shard, hf = entry
        dtype, shape, offset, nbytes = shard.entries[hf]
        dt = np.dtype(_DTYPES[dtype])
        data = np.frombuffer(shard.buffer, dtype=dt, count=nbytes // dt.itemsize,
                             offset=offset).reshape(shape)
        if name.endswith("attn_q.weight"):
            return QuantTensor(name, dtype, shape, permute_qk(data, self.spec.num_heads))
        if name.endswith("attn_k.weight"):
            return QuantTensor(name, dtype, shape, permute_qk(data, self.spec.num_kv_heads))
        return QuantTensor(name, dtype, shape, data, file_offset=offset)

    # -- tokenizer and chat template ----------------------------------------------------
    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            if self._tokenizer_error is not None:
                raise self._tokenizer_error
            try:
                self._tokenizer = load_hf_tokenizer(self.path, self.config, self._vocab_rows())
            except ModelLoadError as exc:
                self._tokenizer_error = exc
                raise
        return self._tokenizer

    def _vocab_rows(self) -> int:
        shard, hf = self._names["token_embd.weight"]
        return shard.entries[hf][1][0]

    @functools.cached_property
    def chat_template(self) -> ChatTemplate | None:
        source = load_hf_chat_template(self.path)
        if source is None:
            return None
        return ChatTemplate.for_tokenizer(source, self.tokenizer, origin=str(self.path))

    def __repr__(self) -> str:
        return f"SafetensorsModelFile({str(self.path)!r})"
