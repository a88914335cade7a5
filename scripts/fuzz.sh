#!/usr/bin/env bash
# Fuzzes what Strata reads from outside with cargo-fuzz (libFuzzer, nightly): the data-plane
# frame decoder, the topology parser and the GGUF header reader (targets in shared/fuzz). The
# corpus in shared/fuzz/corpus seeds each run and is not changed: new inputs go to a scratch
# directory, and crashes to shared/fuzz/artifacts.
# Usage: scripts/fuzz.sh RUNS [TARGET...]    RUNS: executions per target (e.g. 1000000)
#        scripts/fuzz.sh 30s [TARGET...]     or a time per target
# Installs cargo-fuzz (into ~/.cache/strata/tools) on first use; needs a nightly toolchain.
set -euo pipefail
cd "$(dirname "$0")/.."
budget=${1:?usage: scripts/fuzz.sh RUNS|SECONDSs [TARGET...]}
shift
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(frame topology gguf_header)
case "$budget" in
  *s) limit=(-max_total_time="${budget%s}") ;;
  *) limit=(-runs="$budget") ;;
esac
tools="$HOME/.cache/strata/tools"
export PATH="$tools/bin:$PATH"
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "fuzz: no nightly toolchain (rustup toolchain install nightly); cargo-fuzz needs one" >&2
  exit 1
fi
if ! command -v cargo-fuzz >/dev/null; then
  cargo install --quiet --locked --root "$tools" cargo-fuzz
fi
# Its own target directory: sanitizer builds share nothing with the workspace's.
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$HOME/.cache/strata-fuzz-target}"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
cd shared/fuzz
for t in "${targets[@]}"; do
  mkdir -p "$scratch/$t"
  echo "== fuzz $t (${budget})"
  if ! cargo +nightly fuzz run --release "$t" "$scratch/$t" "corpus/$t" -- "${limit[@]}" \
    -print_final_stats=1 >"$scratch/$t.log" 2>&1; then
    tail -n 60 "$scratch/$t.log" >&2
    echo "fuzz: $t failed (above); an input that crashed it is kept in shared/fuzz/artifacts/$t" >&2
    exit 1
  fi
  grep -E 'stat::number_of_executed_units|stat::peak_rss_mb|Done [0-9]+ runs' "$scratch/$t.log"
done
