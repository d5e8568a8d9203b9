"""kvmm generate / stats / sessions / chat against the daemon (in-process CLI), and the
embedded model's greedy output through the daemon compared with `kvmm run`."""
from __future__ import annotations

import io
import json
import subprocess

import pytest

from kvmm_daemon.cli import main
from kvmm_daemon.client import Client
from kvmm_daemon.commands.chat import chat_loop

from .conftest import DaemonProcess, KVMM


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_json_and_text(daemon, capsys):
    code, out, _ = run_cli(capsys, "generate", "--socket", daemon.socket, "--raw", "--max-tokens", "5",
                           "--ignore-eos", "--json", "The quick brown fox")
    d = json.loads(out)
    assert code == 0 and len(d["token_ids"]) == 5 and set(d["usage"]) == {"prompt_tokens", "cached_prompt_tokens", "completion_tokens"}
    assert set(d["timings"]) == {"ttft_s", "prefill_tokens_per_s", "decode_tokens_per_s"}
    code, out, err = run_cli(capsys, "generate", "--socket", daemon.socket, "--raw", "--max-tokens", "5",
                             "--ignore-eos", "The quick brown fox")
    assert code == 0 and out.rstrip("\n") == d["text"].rstrip("\n") and "5 completion" in err
    code, out, _ = run_cli(capsys, "generate", "--socket", daemon.socket, "--token-ids",
                           ",".join(map(str, d["prompt_token_ids"])), "--max-tokens", "5", "--ignore-eos", "--json")
    assert json.loads(out)["token_ids"] == d["token_ids"]
    code, out, _ = run_cli(capsys, "generate", "--socket", daemon.socket, "--raw", "--n", "2", "--temperature", "1",
                           "--max-tokens", "3", "--json", "fox")
    assert len(json.loads(out)["choices"]) == 2


def test_generate_errors_are_one_line(daemon, capsys, tmp_path):
    code, _, err = run_cli(capsys, "generate", "--socket", daemon.socket, "--max-tokens", "0", "x")
    assert code == 2 and err.startswith("kvmm: error: ") and "max_tokens" in err and err.count("\n") == 1
    code, _, err = run_cli(capsys, "stats", "--socket", str(tmp_path / "no.sock"))
    assert code == 2 and "cannot connect" in err


def test_stats_and_sessions(daemon, capsys):
    code, out, _ = run_cli(capsys, "stats", "--json", "--socket", daemon.socket)
    s = json.loads(out)
    assert code == 0 and {"kv", "requests", "clients"} <= set(s)
    code, out, _ = run_cli(capsys, "stats", "--socket", daemon.socket)
    assert "kv blocks" in out and "clients" in out
    assert run_cli(capsys, "sessions", "--socket", daemon.socket, "new", "clitest")[1].strip() == "clitest"
    code, out, _ = run_cli(capsys, "sessions", "--socket", daemon.socket, "ls")
    assert "clitest" in out
    code, out, _ = run_cli(capsys, "sessions", "--socket", daemon.socket, "ls", "--json")
    assert [x["session"] for x in json.loads(out)] == ["clitest"]
    assert run_cli(capsys, "sessions", "--socket", daemon.socket, "rm", "clitest")[0] == 0
    assert json.loads(run_cli(capsys, "sessions", "--socket", daemon.socket, "ls", "--json")[1]) == []


def test_chat_turns_reuse_the_session(daemon):
    out = io.StringIO()
    with Client(daemon.socket) as c:
        name = c.open_session()
        turns = chat_loop(c, name, {"max_tokens": 4, "ignore_eos": True},
                          ["hello", "", "/usage", "and again", "/quit", "never"], out)
        c.delete_session(name)
    assert turns == 2
    usage_line = out.getvalue().splitlines()[-1]
    assert usage_line.startswith("[prompt ") and "(cached 0)" not in usage_line


@pytest.mark.slow
def test_embedded_model_greedy_output_matches_kvmm_run(capsys):
    """The acceptance check: the same greedy tokens in-process and through the daemon."""
    argv = ["--max-tokens", "24", "--json", "What is the capital of France?"]
    run = subprocess.run([KVMM, "run", "--threads", "2", *argv], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    expected = json.loads(run.stdout)
    d = DaemonProcess(model="", args=["--threads", "2", "--socket-group", ""], kv_budget="256MiB", embedded=True)
    try:
        code, out, _ = run_cli(capsys, "generate", "--socket", d.socket, *argv)
        got = json.loads(out)
    finally:
        assert d.stop() == 0
        d.cleanup()
    assert got["prompt_token_ids"] == expected["prompt_token_ids"]
    assert got["token_ids"] == expected["token_ids"] and got["text"] == expected["text"]
    assert "Paris" in got["text"]


def test_the_client_examples_of_docs_service_md_run(daemon, monkeypatch, capsys):
    """Every ```python block of docs/service.md runs against the daemon."""
    import re
    from pathlib import Path
    text = (Path(__file__).resolve().parents[2] / "docs/service.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 2
    monkeypatch.setenv("KVMM_SOCKET", daemon.socket)
    for block in blocks:
        exec(compile(block, "docs/service.md", "exec"), {"__name__": "__docs__"})
    out = capsys.readouterr().out
    assert "cached_prompt_tokens" in out and "tea ->" in out
