#!/usr/bin/env bash
# Throughput under load: `strata load` (closed loop, 1, 4, 16 and 64 concurrent streams) against
# `strata serve` on the default model with one worker process (topologies/bench/one-worker.yml)
# and with two (topologies/default.yml: the same quantization, split in two stages). Both
# services run side by side (an idle one uses no CPU) and are measured in interleaved rounds;
# every line is one measurement, as JSON.
#   decode-heavy: 8-token prompts, 128 tokens generated;  mixed: 128-token prompts, 64 generated.
# Usage: scripts/bench-load.sh [ROUNDS] [STREAMS]      (defaults: 2, "1,4,16,64")
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-2}
streams=${2:-1,4,16,64}
source scripts/bench-lib.sh
declare -A addr pid
for entry in one=topologies/bench/one-worker.yml two=topologies/default.yml; do
  start_service "${entry%%=*}" "${entry#*=}"
done
trap stop_services EXIT
for round in $(seq 1 "$rounds"); do
  echo "== round $round"
  for shape in "decode-heavy 8 128" "mixed 128 64"; do
    set -- $shape
    for name in one two; do
      "$strata" load --addr "${addr[$name]}" --streams "$streams" --prompt-tokens "$2" \
        --gen-tokens "$3" --seed "$round" --json |
        sed "s/^{/{\"workers\":\"$name\",\"shape\":\"$1\",/"
    done
  done
done
