import pytest

from tests.daemon.conftest import _load_tiny_llama


@pytest.fixture(scope="session")
def sec_model(tmp_path_factory):
    # its own directory name: other suites derive their model's name from "tiny-llama<N>"
    return _load_tiny_llama()(tmp_path_factory.mktemp("sec-llama"), context=512)
