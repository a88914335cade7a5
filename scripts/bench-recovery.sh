#!/usr/bin/env bash
# Recovery from a worker crash: `strata serve` on the default topology (two worker processes)
# under 16 closed-loop streams (`strata load`, 8-token prompts, 256 generated, greedy); once the
# streams run, one worker is killed with SIGKILL (alternately the first and the second stage's).
# The longest gap between two tokens of any stream (`inter_token_ms_max`) is the time from the
# kill to the first token after it, give or take one step; every request must still succeed.
# Usage: scripts/bench-recovery.sh [KILLS]      (default 10)
set -euo pipefail
cd "$(dirname "$0")/.."
kills=${1:-10}
source scripts/bench-lib.sh
declare -A addr pid
log=$(mktemp)
"$strata" serve --listen 127.0.0.1:0 >"$log.out" 2>"$log" &
pid[serve]=$!
trap 'kill -TERM ${pid[serve]} 2>/dev/null || true; wait; rm -f "$log" "$log.out"' EXIT
for _ in $(seq 1 600); do grep -q '"ready"' "$log.out" && break; sleep 0.2; done
addr=$(sed -n 's/.*"listen":"\([^"]*\)".*/\1/p' "$log.out")
for i in $(seq 1 "$kills"); do
  device="cpu[$(( (i - 1) % 2 ))]"
  "$strata" load --addr "$addr" --streams 16 --prompt-tokens 8 --gen-tokens 256 --seed "$i" \
    --json >"$log.load" &
  load=$!
  sleep 2
  victim=$(grep 'worker started' "$log" | grep -F "device=$device" | tail -1 | sed 's/.*pid=\([0-9]*\).*/\1/')
  kill -KILL "$victim"
  wait "$load"
  sed "s/^{/{\"kill\":$i,\"device\":\"$device\",/" "$log.load"
done
rm -f "$log.load"
grep -E 'the ring is rebuilt' "$log" | sed 's/.*seconds=\([0-9.]*\).*/rebuilt in \1 s/'
