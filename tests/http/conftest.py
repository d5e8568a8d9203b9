"""Fixtures of the HTTP API tests: one `kvmm serve` on the tiny model with the HTTP API on a
Unix socket and on loopback TCP, and OpenAI clients bound to either."""
from __future__ import annotations

import socket

import httpx
import openai
import pytest

from tests.daemon.conftest import DaemonProcess, slow_model, sock_dir, tiny_model  # noqa: F401 - fixtures

ROOT_KEY = "sk-kvmm-test-root-0000"           # the TCP key of uid 0
NOBODY_KEY = "sk-kvmm-test-nobody-65534"      # the TCP key of uid 65534
MODEL = "tiny-llama"                          # the id of the tiny model (its directory's name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def http_daemon(tiny_model, tmp_path_factory):
    conf = tmp_path_factory.mktemp("http-conf") / "kvmm.toml"
    conf.write_text(f'[daemon]\nmax_kv_blocks_per_uid = 256\n'
                    f'http_api_keys = {{ "{ROOT_KEY}" = 0, "{NOBODY_KEY}" = 65534 }}\n')
    port = free_port()
    d = DaemonProcess(tiny_model, http=True, args=["--socket-group", "nogroup", "--config", str(conf),
                                                  "--http-listen", f"127.0.0.1:{port}"])
    d.http_base = f"http://127.0.0.1:{port}"
    yield d
    d.stop_and_check()


def unix_http(path: str, **kw) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=path), base_url="http://kvmm", timeout=60, **kw)


def openai_unix(path: str) -> openai.OpenAI:
    """The openai client over the Unix socket (its API key is ignored there)."""
    return openai.OpenAI(base_url="http://kvmm/v1", api_key="ignored-on-the-unix-socket",
                         http_client=unix_http(path), max_retries=0)


@pytest.fixture
def oai(http_daemon) -> openai.OpenAI:
    with openai_unix(http_daemon.http_socket) as client:
        yield client
