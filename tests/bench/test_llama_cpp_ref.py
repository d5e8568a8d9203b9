"""The llama.cpp reference harness of `kvmm bench decode --vs-llama-cpp`: it computes what
kvmm computes on the same file before its speed is compared, with the stated settings."""
import json
import subprocess
import sys

from kvmm_daemon.bench.llama_cpp_ref import LlamaCpp
from kvmm_daemon.model.model_file import default_model_path
from tests.bench.conftest import needs_llama_cpp

PROMPT = "The capital of France is"


@needs_llama_cpp
def test_harness_agrees_with_kvmm_and_states_its_settings():
    kvmm = json.loads(subprocess.run(
        [sys.executable, "-m", "kvmm_daemon.cli", "run", "--raw", "--json", "--max-tokens", "3", "--threads", "1",
         PROMPT], capture_output=True, text=True, check=True).stdout)
    ref = LlamaCpp(str(default_model_path()), threads=1, max_seqs=2, n_ctx_per_seq=64)
    try:
        assert ref.greedy(kvmm["prompt_token_ids"], 1) == kvmm["token_ids"][:1]     # " Paris"
        assert ref.settings["n_ctx"] == 256 and ref.settings["load"] == "mmap"      # sized to the run
        assert ref.settings["llama_cpp_python"] and "CPU" in ref.settings["llama_cpp_system"]
        assert "flash_attn" in ref.settings and "kv_cache_type" in ref.settings
        tps = ref.decode_tokens_per_s([kvmm["prompt_token_ids"]] * 2, 3)
        assert tps > 0 and ref.last_steps == 3
    finally:
        ref.close()
