#!/usr/bin/env bash
# The demo: set up the machine (idempotent), then generate on the embedded SmolLM2-135M with
# its KV cache in the paged block pool, showing what the pool holds.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
KVMM=.venv/bin/kvmm
echo "== greedy generation, chat template (kvmm run --show-kv)"
$KVMM run --show-kv --max-tokens 64 "What is the capital of France? Answer in one sentence."
echo
echo "== raw prompt, JSON output"
$KVMM run --raw --json --max-tokens 24 "The capital of France is"
echo
echo "== 3 parallel samples sharing the prompt's KV blocks (copy-on-write)"
$KVMM run --n 3 --temperature 0.8 --seed 1 --max-tokens 24 --show-kv "Write a one-line poem about the sea."
echo
echo "== teacher-forced scoring (like llama-perplexity)"
$KVMM score "The capital of France is Paris. The capital of Italy is Rome."
echo
echo "== KV pool benchmark (no model compute)"
$KVMM bench kv
