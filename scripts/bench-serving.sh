#!/usr/bin/env bash
# Single-stream serving figures through 1, 2 and 3 worker processes (the same quantization
# layout), beside the single-process engine. The three services run side by side (idle ones use
# no CPU) and are measured in interleaved rounds, so machine noise hits every configuration alike;
# the best round of each is reported.
# Usage: scripts/bench-serving.sh [PROMPT_TOKENS] [GEN_TOKENS] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
prompt=${1:-128}; gen=${2:-128}; rounds=${3:-5}
source scripts/bench-lib.sh
declare -A addr pid
topologies=(one=topologies/bench/one-worker.yml two=topologies/default.yml three=topologies/bench/three-workers.yml)
for entry in "${topologies[@]}"; do
  start_service "${entry%%=*}" "${entry#*=}"
done
trap stop_services EXIT
for round in $(seq 1 "$rounds"); do
  echo "== round $round"
  echo -n "single process: "
  "$strata" bench --topology topologies/bench/one-worker.yml --prompt-tokens "$prompt" --gen-tokens "$gen" --reps 1 2>/dev/null
  for name in one two three; do
    "$strata" bench-serve --addr "${addr[$name]}" --prompt-tokens "$prompt" --gen-tokens "$gen" --reps 1
  done
done
