"""open_model dispatch and the embedded default model."""

import pytest

from kvmm_daemon.errors import ModelLoadError
from kvmm_daemon.model import model_file
from kvmm_daemon.model.gguf_file import GGUFModelFile
from kvmm_daemon.model.model_file import default_model_path, open_model
from kvmm_daemon.model.safetensors_file import SafetensorsModelFile

from .tiny_llama import write_tiny_llama


def test_default_model_is_the_embedded_gguf():
    path = default_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert isinstance(open_model(), GGUFModelFile)


def test_default_model_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr(model_file, "DEFAULT_MODEL_PACKAGE", "no_such_pkg_kvmm")
    with pytest.raises(ModelLoadError, match="run scripts/setup.sh"):
        default_model_path()


def test_dispatch_on_directory_and_magic(tmp_path):
    assert isinstance(open_model(write_tiny_llama(tmp_path / "hf")), SafetensorsModelFile)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="has no config.json"):
        open_model(tmp_path / "empty")
    (tmp_path / "x.bin").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="is not a GGUF file"):
        open_model(tmp_path / "x.bin")


def test_messages_are_one_line(tmp_path):
    for target in (tmp_path / "missing.gguf", tmp_path):
        with pytest.raises(ModelLoadError) as err:
            open_model(target)
        assert "\n" not in str(err.value) and "--model" in str(err.value)
