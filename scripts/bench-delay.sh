#!/usr/bin/env bash
# Pipelining against hop latency: two remote `strata worker`s and `strata gateway` on the default
# topology, every data-plane hop (gateway → stage 0 → stage 1 → gateway) through a proxy
# (scripts/delay-proxy.py) that adds DELAY_MS one way, against the same set-up through a proxy
# that adds nothing. Each process listens on 127.0.0.1 and advertises 127.0.0.2, where its
# proxy listens. `strata load` runs 16 closed-loop decode-heavy streams (8-token prompts, 128
# generated) against each, in interleaved rounds.
# Usage: scripts/bench-delay.sh [ROUNDS] [DELAY_MS]      (defaults: 3, 2)
#   STEPS           the gateways' --steps-in-flight (default: theirs, one per stage and more
#                   while the hops take long; each gateway's log, where it says when it
#                   changes the count, is /tmp/delay-<direct|delayed>.gw.log)
#   WORKER_THREADS  each worker's --threads (default: half the cores: they share them)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
delay=${2:-2}
# The two workers share this host's cores, as `strata serve` shares them out.
worker_threads=${WORKER_THREADS:-$(( $(nproc) / 2 > 0 ? $(nproc) / 2 : 1 ))}
source scripts/bench-lib.sh
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pids=()
certs=$(mktemp -d)
trap 'kill ${pids[*]} 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$certs"' EXIT
# Mutual TLS between the processes, as deployed: one certificate set for both addresses.
"$strata" certs --out "$certs" --name 127.0.0.1 --name 127.0.0.2 >/dev/null
tls=(--tls-cert "$certs/tls.crt" --tls-key "$certs/tls.key" --tls-ca "$certs/ca.crt")
declare -A gw
# setup NAME MS: workers, proxies and gateway for one configuration; sets gw[NAME].
setup() {
  local name=$1 ms=$2 pw0 pw1 pg ready
  pw0=$(free_port); pw1=$(free_port); pg=$(free_port)
  scripts/delay-proxy.py "$ms" "127.0.0.2:$pw0" "127.0.0.1:$pw0" "127.0.0.2:$pw1" "127.0.0.1:$pw1" \
    "127.0.0.2:$pg" "127.0.0.1:$pg" >"/tmp/delay-$name.proxy" &
  pids+=($!)
  local controls=()
  for i in 0 1; do
    local port=$pw0; [ "$i" = 1 ] && port=$pw1
    "$strata" worker --threads "$worker_threads" --listen 127.0.0.1:0 --data-listen "127.0.0.1:$port" --advertise-host 127.0.0.2 \
      "${tls[@]}" >"/tmp/delay-$name.w$i" 2>/dev/null &
    pids+=($!)
  done
  for i in 0 1; do
    for _ in $(seq 1 100); do grep -q control "/tmp/delay-$name.w$i" && break; sleep 0.1; done
    controls+=("$(sed -n 's/.*"control":"\([^"]*\)".*/\1/p' "/tmp/delay-$name.w$i")")
  done
  "$strata" gateway --topology topologies/default.yml --listen 127.0.0.1:0 \
    --data-listen "127.0.0.1:$pg" --advertise-host 127.0.0.2 \
    --worker "cpu[0]=http://${controls[0]}" --worker "cpu[1]=http://${controls[1]}" "${tls[@]}" \
    ${STEPS:+--steps-in-flight "$STEPS"} \
    >"/tmp/delay-$name.gw" 2>"/tmp/delay-$name.gw.log" &
  pids+=($!)
  for _ in $(seq 1 600); do grep -q '"ready"' "/tmp/delay-$name.gw" && break; sleep 0.2; done
  gw[$name]=$(sed -n 's/.*"listen":"\([^"]*\)".*/\1/p' "/tmp/delay-$name.gw")
  [ -n "${gw[$name]}" ] || { echo "the $name gateway did not start" >&2; exit 1; }
}
setup direct 0
setup delayed "$delay"
for round in $(seq 1 "$rounds"); do
  for name in direct delayed; do
    "$strata" load --addr "${gw[$name]}" --streams 16 --prompt-tokens 8 --gen-tokens 128 \
      --seed "$round" --json | sed "s/^{/{\"round\":$round,\"hops\":\"$name\",/"
  done
done
