"""GGUFModelFile: a Llama-family GGUF file as ModelSpec + QuantTensors + tokenizer.

The file is mapped read-only once; tensors are numpy views into the mapping, so opening a
model costs one header parse (gguf_reader.py) and a model-id hash, and the page cache /
the weight pool decide what becomes resident. Hyper-parameters are read from the
`{arch}.*` keys the way llama.cpp's llm_load_hparams does, and every tensor the forward
pass needs is checked for presence, shape and a readable type before anything runs.

Prior art: llama.cpp llama-model-loader.cpp, gguf-py's GGUFReader. Left out: split
(multi-file) GGUFs, architectures other than llama, rope scaling types other than llama3's
frequency factors (tensor rope_freqs.weight, passed through as a tensor).
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import Any

from kvmm_daemon.errors import ModelLoadError
from kvmm_daemon.model.chat_template import ChatTemplate
from kvmm_daemon.model.gguf_reader import GGUFContainer, TensorInfo
from kvmm_daemon.model.quant_tensor import QuantTensor, check_supported_type, storage_nbytes
from kvmm_daemon.model.spec import ModelSpec
from kvmm_daemon.model.tokenizer import Tokenizer

SUPPORTED_ARCHS = ("llama",)
_SAMPLE = 4096  # bytes hashed at the start, middle and end of every tensor for model_id


class GGUFModelFile:
    """A GGUF model.

    Attributes:
      path: the file.
      metadata: every key/value of the header as plain Python values.
      spec: the ModelSpec (validated against the tensor directory).
    Invariant: every name in spec.tensor_shapes() is in tensor_names() with that shape and
    a supported type.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._gguf = GGUFContainer(self.path)
        self.metadata: dict[str, Any] = self._gguf.metadata
        self._infos: dict[str, TensorInfo] = self._gguf.tensors
        self.spec = self._build_spec()
        self._check_tensors()

    # -- spec ---------------------------------------------------------------------------
    def _key(self, key: str, default: Any = ...) -> Any:
        value = self.metadata.get(key, default)
        if value is ...:
            raise ModelLoadError(f"{self.path}: metadata key {key!r} is missing; the file is "
                                 "not a complete llama.cpp GGUF model, re-convert it")
        return value

    def _build_spec(self) -> ModelSpec:
        arch = self._key("general.architecture")
        if arch not in SUPPORTED_ARCHS:
            raise ModelLoadError(
                f"{self.path}: architecture {arch!r} is not supported (supported: "
                f"{', '.join(SUPPORTED_ARCHS)}, e.g. Llama 2/3, SmolLM, TinyLlama); "
                "use a Llama-family model")
        scaling = self.metadata.get(f"{arch}.rope.scaling.type", "none")
        if scaling not in ("none", None):
            raise ModelLoadError(f"{self.path}: rope scaling {scaling!r} is not supported; "
                                 "use a model without rope scaling (or llama3 rope factors)")
        if "token_embd.weight" not in self._infos:
            raise ModelLoadError(f"{self.path} lacks tensor 'token_embd.weight'; the file is "
                                 "incomplete or not a Llama model")
        hidden = int(self._key(f"{arch}.embedding_length"))
        heads = int(self._key(f"{arch}.attention.head_count"))
        kv_heads = int(self.metadata.get(f"{arch}.attention.head_count_kv", heads))
        head_dim = int(self.metadata.get(f"{arch}.attention.key_length", hidden // heads))
        vocab = int(self._infos["token_embd.weight"].dims[-1])
        bos = self.metadata.get("tokenizer.ggml.bos_token_id")
        eos = self.metadata.get("tokenizer.ggml.eos_token_id")
        return ModelSpec(
            arch=arch,
            name=str(self.metadata.get("general.name") or self.path.stem),
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=int(self._key(f"{arch}.feed_forward_length")),
            num_layers=int(self._key(f"{arch}.block_count")),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(self._key(f"{arch}.attention.layer_norm_rms_epsilon")),
            rope_theta=float(self.metadata.get(f"{arch}.rope.freq_base", 10000.0)),
            rope_dim=int(self.metadata.get(f"{arch}.rope.dimension_count", head_dim)),
            context_length=int(self._key(f"{arch}.context_length")),
            tie_word_embeddings="output.weight" not in self._infos,
            bos_token_id=int(bos) if bos is not None and 0 <= bos < vocab else None,
            eos_token_id=int(eos) if eos is not None and 0 <= eos < vocab else None,
            model_id=self._model_id(),
        )

    def _model_id(self) -> str:
        """sha256 of the header (metadata + tensor directory) and of 3 x 4 KiB samples of
        every tensor's bytes: cheap, and different for different weights in practice."""
        h = hashlib.sha256(b"kvmm-gguf-v1\0")
        buf = self._gguf.buffer
        h.update(buf[:self._gguf.header_size])
        # The samples are read with pread, not through the mapping, and without readahead:
        # faulting them in would map ~30 MiB of the file into a process whose memory is
        # budgeted (fault-around), and readahead would fill the page cache with ~100 MiB.
        with open(self.path, "rb") as f:
            fd = f.fileno()
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            for info in sorted(self._infos.values(), key=lambda i: i.data_offset):
                nbytes = self._nbytes(info)
                start, end = info.data_offset, min(info.data_offset + nbytes, len(buf))
                mid = max(start, (start + end) // 2 - _SAMPLE // 2)
                for a in sorted({start, mid, max(start, end - _SAMPLE)}):
                    if (n := min(a + _SAMPLE, end) - a) > 0:
                        h.update(os.pread(fd, n, a))
        return "sha256:" + h.hexdigest()

    def _nbytes(self, info: TensorInfo) -> int:
        check_supported_type(info.name, info.ggml_type, str(self.path))
        return storage_nbytes(info.ggml_type, tuple(reversed(info.dims)))

    def _check_tensors(self) -> None:
        size = len(self._gguf.buffer)
        for info in self._infos.values():
            if info.data_offset + self._nbytes(info) > size:  # type readable, bytes present
                raise ModelLoadError(f"{self.path} is truncated: tensor {info.name!r} ends "
                                     "past the end of the file; download the model again")
        expected = self.spec.tensor_shapes()
        missing = [name for name in expected if name not in self._infos]
        if missing:
            shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more"
                                              if len(missing) > 4 else "")
            raise ModelLoadError(f"{self.path} lacks tensor(s) {shown}; the file is "
                                 "incomplete or not a Llama model")
        for name, shape in expected.items():
            got = tuple(reversed(self._infos[name].dims))
            if got != shape:
                raise ModelLoadError(f"{self.path}: tensor {name!r} has shape {list(got)}, "
                                     f"but the metadata implies {list(shape)}; the file is "
                                     "corrupt or mislabelled")

    # -- tensors ------------------------------------------------------------------------
    def tensor_names(self) -> list[str]:
        """All tensor names in file order (includes optional ones like rope_freqs.weight)."""
        return list(self._infos)

    def has_tensor(self, name: str) -> bool:
        return name in self._infos

    def tensor(self, name: str) -> QuantTensor:
        """The named tensor; its data is a read-only view of the mapped file."""
        info = self._infos.get(name)
        if info is None:
            raise ModelLoadError(f"{self.path} has no tensor {name!r}")
        shape = tuple(reversed(info.dims))
        raw = self._gguf.tensor_bytes(info, self._nbytes(info))
        if info.ggml_type in ("F32", "F16", "BF16"):
            dtype = {"F32": "<f4", "F16": "<f2", "BF16": "<u2"}[info.ggml_type]
            data = raw.view(dtype).reshape(shape)
        else:
            data = raw.reshape(*shape[:-1], -1) if len(shape) > 1 else raw
        return QuantTensor(name, info.ggml_type, shape, data, file_offset=info.data_offset)

    # -- tokenizer and chat template ----------------------------------------------------
    @functools.cached_property
    def tokenizer(self) -> Tokenizer:
        md = self.metadata
        model = md.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ModelLoadError(f"{self.path}: tokenizer model {model!r} is not supported "
                                 "(kvmm reads byte-level BPE vocabularies, tokenizer.ggml.model "
                                 "'gpt2'); use a model with a GPT-2 style BPE tokenizer")
        tokens = md.get("tokenizer.ggml.tokens")
        merges = md.get("tokenizer.ggml.merges")
        if not tokens or merges is None:
            raise ModelLoadError(f"{self.path}: tokenizer tokens or merges are missing; "
                                 "re-convert the model with llama.cpp's convert_hf_to_gguf.py")
        types = md.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        tokenizer = Tokenizer(tokens, types, merges, pre=md.get("tokenizer.ggml.pre", "default"),
                              bos_token_id=md.get("tokenizer.ggml.bos_token_id"),
                              eos_token_id=md.get("tokenizer.ggml.eos_token_id"),
                              add_bos=md.get("tokenizer.ggml.add_bos_token"),
                              source=str(self.path))
        # The tokenizer holds what it needs; the metadata's copies (~10 MiB of strings for a
        # 49k vocabulary) would only weigh on a budgeted daemon.
        for key in ("tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.tokens"):
            md.pop(key, None)
        return tokenizer

    @functools.cached_property
    def chat_template(self) -> ChatTemplate | None:
        """The model's chat template, or None when the file has none."""
        source = self.metadata.get("tokenizer.chat_template")
        if not source:
            return None
        return ChatTemplate.for_tokenizer(source, self.tokenizer, origin=str(self.path))

    def __repr__(self) -> str:
        return f"GGUFModelFile({str(self.path)!r}, arch={self.spec.arch!r})"
