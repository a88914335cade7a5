#!/usr/bin/env bash
# The cost of mutual TLS on the links: `strata serve` on the default topology (two worker
# processes: three data-plane hops and the control plane under mutual TLS) against the same with
# `--insecure` (plaintext). Both run side by side (an idle one uses no CPU) and are measured in
# interleaved rounds: one stream (`strata bench-serve`, 128-token prompt, 128 generated), then 16
# concurrent decode-heavy streams (`strata load`, 8-token prompts, 128 generated).
# Usage: scripts/bench-tls.sh [ROUNDS]      (default 3)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
source scripts/bench-lib.sh
declare -A addr pid
start_service mtls topologies/default.yml
start_service plaintext topologies/default.yml --insecure
trap stop_services EXIT
for round in $(seq 1 "$rounds"); do
  echo "== round $round"
  for name in mtls plaintext; do
    echo -n "$name: "
    "$strata" bench-serve --addr "${addr[$name]}" --prompt-tokens 128 --gen-tokens 128 --reps 1
  done
  for name in mtls plaintext; do
    "$strata" load --addr "${addr[$name]}" --streams 16 --prompt-tokens 8 --gen-tokens 128 \
      --seed "$round" --json | sed "s/^{/{\"round\":$round,\"links\":\"$name\",/"
  done
done
