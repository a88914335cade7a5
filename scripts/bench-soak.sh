#!/usr/bin/env bash
# Soak: 64 concurrent streams against `strata serve` on the default topology for MINUTES
# minutes (default 10), as `strata load` rounds back to back (prompts of 8 to 256 tokens, 32 to
# 128 generated). After each round: its figures and errors (from `strata load --json`), then the
# resident memory of the gateway and of each worker (KiB, from /proc).
# Usage: scripts/bench-soak.sh [MINUTES]
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=${1:-10}
source scripts/bench-lib.sh
declare -A addr pid
start_service soak topologies/default.yml
trap stop_services EXIT
end=$((SECONDS + minutes * 60))
round=0
while [ "$SECONDS" -lt "$end" ]; do
  round=$((round + 1))
  "$strata" load --addr "${addr[soak]}" --streams 64 --prompt-tokens 8-256 --gen-tokens 32-128 \
    --seed "$round" --json
  rss=$(for p in "${pid[soak]}" $(pgrep -P "${pid[soak]}"); do
    awk '/VmRSS/ {print $2}' "/proc/$p/status"
  done | paste -sd, -)
  echo "{\"round\":$round,\"elapsed_s\":$SECONDS,\"rss_kib\":[$rss]}"
done
