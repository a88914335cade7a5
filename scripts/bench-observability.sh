#!/usr/bin/env bash
# The cost of observability: decode-heavy `strata load` (8-token prompts, 128 generated) at 1 and
# 16 streams against two `strata serve` services on the default topology, side by side (an idle
# one uses no CPU) and measured in interleaved rounds:
#   off: no trace export, no metrics endpoint;
#   on:  every span exported over OTLP/gRPC to a local receiver (scripts/otlp-sink.py) and the
#        gateway's /metrics scraped every second.
# Every line is one measurement, as JSON.
# Usage: scripts/bench-observability.sh [ROUNDS] [STREAMS]    (defaults: 3, "1 16")
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
streams_list=${2:-1 16}
source scripts/bench-lib.sh
venv=$(scripts/setup-test-peers.sh)
"$venv/bin/python" -c 'import opentelemetry.proto' 2>/dev/null ||
  "$venv/bin/pip" install --quiet --disable-pip-version-check opentelemetry-proto==1.45.2 >&2
declare -A addr pid metrics_addr
sink_out=$(mktemp)
"$venv/bin/python" scripts/otlp-sink.py >"$sink_out" &
pid[sink]=$!
for _ in $(seq 1 100); do [ -s "$sink_out" ] && break; sleep 0.1; done
sink_port=$(head -1 "$sink_out")
start_service off topologies/default.yml
OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:$sink_port" \
  start_service on topologies/default.yml --metrics-listen 127.0.0.1:0
metrics=${metrics_addr[on]}
[ -n "$metrics" ] || { echo "the 'on' service reported no metrics address" >&2; exit 1; }
( while sleep 1; do curl -sf "http://$metrics/metrics" >/dev/null || true; done ) &
pid[scraper]=$!
trap stop_services EXIT
for round in $(seq 1 "$rounds"); do
  echo "== round $round"
  for streams in $streams_list; do
    for name in off on; do
      "$strata" load --addr "${addr[$name]}" --streams "$streams" --prompt-tokens 8 \
        --gen-tokens 128 --seed "$round" --json |
        sed "s/^{/{\"observability\":\"$name\",/"
    done
  done
done
