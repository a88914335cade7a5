#!/usr/bin/env bash
# Single-process figures on the default model at 2 threads, interleaved with llama.cpp's
# llama-bench on the same GGUF (install it with scripts/get-llama-bench.sh DEST and pass
# LLAMA_BENCH=DEST/bin/llama-bench). Prints one line per run; compare the best round of each.
# Usage: scripts/bench-engine.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
source scripts/bench-lib.sh
model=$("$strata" fetch-model 2>/dev/null)
for round in $(seq 1 "$rounds"); do
  echo "== round $round"
  if [ -n "${LLAMA_BENCH:-}" ]; then
    "$LLAMA_BENCH" -m "$model" -t 2 -p 128 -n 128 -r 5 -o json 2>/dev/null | python3 -c '
import json, sys
runs = {("prefill" if r["n_prompt"] else "decode"): r["avg_ts"] for r in json.load(sys.stdin)}
print("llama.cpp Q4_1:   prefill %.1f tok/s (128 tokens), decode %.1f tok/s (128 tokens), mean of 5" % (runs["prefill"], runs["decode"]))'
  fi
  echo -n "strata f32:       "; "$strata" --threads 2 bench --topology none --dtype f32 --prompt-tokens 128 --gen-tokens 128 --reps 3 2>/dev/null
  echo -n "strata Q4_1 (as stored): "; "$strata" --threads 2 bench --topology none --prompt-tokens 128 --gen-tokens 128 --reps 3 2>/dev/null
done
