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
echo
echo "== weights bigger than memory: a 22 MiB weight pool, the rest streamed from flash"
STATE=$(mktemp -d /var/tmp/kvmm-demo-state.XXXXXX)   # the weight file: on disk, read with O_DIRECT
$KVMM weights prepare --state-dir "$STATE"
for budget in "" 22MiB; do
  $KVMM run --raw --json --max-tokens 24 --kv-budget 16MiB --max-model-len 256 --state-dir "$STATE" \
      ${budget:+--weight-budget $budget} "The capital of France is" 2>/dev/null | .venv/bin/python -c '
import json, sys
d = json.load(sys.stdin)
label = sys.argv[1] or "none (all resident)"
tps = d["timings"]["decode_tokens_per_s"]
print("weight budget", label, ":", round(tps, 1), "tok/s, first tokens", d["token_ids"][:8])' "$budget"
done
rm -rf "$STATE"
echo

# --- the daemon: one model shared by several clients, KV on flash, the swapfs view --------
RUN=$(mktemp -d /tmp/kvmm-demo.XXXXXX)          # socket and mount point
SWAP=$(mktemp -d /var/tmp/kvmm-demo-swap.XXXXXX) # O_DIRECT needs a disk file system, not tmpfs
export KVMM_SOCKET=$RUN/kvmm.sock
mkdir -p "$RUN/view"
cleanup() {
  if [ -n "${DAEMON:-}" ] && kill -0 "$DAEMON" 2>/dev/null; then kill -TERM "$DAEMON"; wait "$DAEMON" || true; fi
  rm -rf "$RUN" "$SWAP"
}
trap cleanup EXIT
echo "== kvmm serve (socket $KVMM_SOCKET, swap $SWAP, view $RUN/view)"
$KVMM serve --socket "$KVMM_SOCKET" --socket-group "" --swap-dir "$SWAP" --swap-size 256MiB \
    --mount "$RUN/view" --log-level warning &
DAEMON=$!
for _ in $(seq 1 120); do $KVMM stats >/dev/null 2>&1 && break; sleep 0.5; done
echo "== 4 clients generating at once"
i=0
for q in "Name a planet." "Name a colour." "Name a fruit." "Name a river."; do
  i=$((i + 1))
  { echo "$q"; $KVMM generate --max-tokens 24 "$q" 2>&1; } > "$RUN/out.$i" &
done
wait $(jobs -p | grep -v "^$DAEMON\$") 2>/dev/null || true
for f in "$RUN"/out.*; do echo "-- $(head -c 300 "$f" | tr '\n' ' ')"; done
echo "== a session: the second turn reuses the first turn's KV (cached_prompt_tokens)"
$KVMM generate --session demo --max-tokens 24 "My name is Ada. Say hello to me."
$KVMM generate --session demo --json --max-tokens 24 "What is my name?" | \
  .venv/bin/python -c 'import json,sys; d=json.load(sys.stdin); print(d["text"]); print("usage:", d["usage"])'
echo "== the swapfs view: ls, df"
ls -l "$RUN/view/sessions"
df -h "$RUN/view"
echo "== kvmm stats"
$KVMM stats
