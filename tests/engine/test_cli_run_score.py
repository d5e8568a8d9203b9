"""`kvmm run` / `kvmm score` as a user calls them: JSON contracts and one-line errors."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest


def kvmm(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvmm_daemon.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_run_json_contract(tiny_model):
    p = kvmm("run", "--model", str(tiny_model), "--raw", "--json", "--max-tokens", "5", "--ignore-eos",
             "--kv-budget", "4MiB", "--block-size", "4", "--max-model-len", "128", "hello world")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert set(out) >= {"text", "token_ids", "prompt_token_ids", "usage", "timings"}
    assert set(out["usage"]) == {"prompt_tokens", "cached_prompt_tokens", "completion_tokens"}
    assert set(out["timings"]) == {"ttft_s", "prefill_tokens_per_s", "decode_tokens_per_s"}
    assert len(out["token_ids"]) == out["usage"]["completion_tokens"] == 5


def test_run_n_and_beams_give_choices(tiny_model):
    for opt in (["--n", "3", "--temperature", "40", "--seed", "1"], ["--beam-width", "3"]):
        p = kvmm("run", "--model", str(tiny_model), "--raw", "--json", "--max-tokens", "4", "--ignore-eos",
                 "--kv-budget", "4MiB", "--block-size", "4", "--max-model-len", "128", *opt, "hello")
        assert p.returncode == 0, p.stderr
        assert len(json.loads(p.stdout)["choices"]) == 3


def test_score_json_contract(tiny_model):
    p = kvmm("score", "--model", str(tiny_model), "--json", "--kv-budget", "4MiB", "--block-size", "4",
             "--max-model-len", "128", "--token-ids", "5,17,42,99,7")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert len(out["top1_next"]) == len(out["logprob_of_next"]) == 4
    assert out["perplexity"] > 1


@pytest.mark.parametrize("args, words", [
    (["run", "--model", "/no/such/model.gguf", "x"], "not found"),
    (["run", "--kv-budget", "1MiB", "x"], "raise --kv-budget"),
    (["run", "--kv-budget", "lots", "x"], "is not a size"),
    (["run", "--raw", "--max-model-len", "4", "--kv-budget", "64MiB", "one two three four five six"], "max_model_len"),
    (["run", "--top-p", "0", "x"], "top_p"),
    (["score", "--token-ids", "1,x"], "comma-separated"),
])
def test_bad_input_is_one_line_error(args, words):
    p = kvmm(*args)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvmm: error:") and words in lines[0], p.stderr


def test_unsupported_architecture_is_refused(tmp_path, tiny_model):
    import shutil
    d = tmp_path / "m"
    shutil.copytree(tiny_model, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["MambaForCausalLM"], "mamba"
    (d / "config.json").write_text(json.dumps(cfg))
    p = kvmm("run", "--model", str(d), "--raw", "x")
    assert p.returncode == 2 and "Traceback" not in p.stderr and "architecture" in p.stderr.lower(), p.stderr
