# Sourced by the benchmark scripts (from the repository root).
#
# Sets `strata` (the release binary: $STRATA, or built here) and prints the CPU's model name.
strata=${STRATA:-${CARGO_TARGET_DIR:-target}/release/strata}
[ -x "$strata" ] || cargo build --release --quiet
lscpu | grep -E '^Model name' || true

# start_service NAME TOPOLOGY [ARGS...]: runs `strata serve --topology TOPOLOGY ARGS...` on a
# free port in the background and records it in the caller's associative arrays `addr[NAME]`
# and `pid[NAME]`; fails if it does not become ready. The caller stops them (`stop_services`
# on EXIT).
start_service() {
  local name=$1 topo=$2 out
  out=$(mktemp)
  "$strata" serve --topology "$topo" --listen 127.0.0.1:0 "${@:3}" >"$out" 2>/dev/null &
  pid[$name]=$!
  for _ in $(seq 1 600); do grep -q '"ready"' "$out" && break; sleep 0.2; done
  addr[$name]=$(sed -n 's/.*"listen":"\([^"]*\)".*/\1/p' "$out")
  # With --metrics-listen, where /metrics is (for callers that declare `metrics_addr`).
  if declare -p metrics_addr >/dev/null 2>&1; then
    metrics_addr[$name]=$(sed -n 's/.*"metrics":"\([^"]*\)".*/\1/p' "$out")
  fi
  rm -f "$out"
  [ -n "${addr[$name]}" ] || { echo "the $name service ($topo) did not start" >&2; return 1; }
}

stop_services() {
  for p in "${pid[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait
}
