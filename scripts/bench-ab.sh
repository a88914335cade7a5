#!/usr/bin/env bash
# Two builds of `strata` against each other on one machine, in one interleaved run (A, B, A, B
# per round and shape), then the best round of each: prefill and single-sequence decode tok/s,
# and a batch of 16 where the shape has one. Figures, not tests.
#
# Usage:  scripts/bench-ab.sh A_BINARY B_BINARY [ROUNDS]
#   e.g.  git worktree add /tmp/base main && (cd /tmp/base && cargo build --release) &&
#         cp $CARGO_TARGET_DIR/release/strata /tmp/strata-a   (then build the change as B)
#   SHAPES  default "128:32:16 1024:16:0 4000:64:0" (prompt tokens : generated : batch)
#   THREADS default 2
#   EXTRA   more `strata bench` arguments for both, e.g. "--dtype bf16"
#   TOPOLOGY  default none (every layer as stored), e.g. topologies/bench/one-worker.yml
# Needs:  python3, the default model (`strata fetch-model`).
set -euo pipefail
a=${1:?usage: bench-ab.sh A_BINARY B_BINARY [ROUNDS]}
b=${2:?usage: bench-ab.sh A_BINARY B_BINARY [ROUNDS]}
rounds=${3:-3}
shapes=${SHAPES:-"128:32:16 1024:16:0 4000:64:0"}
threads=${THREADS:-2}
read -r -a extra <<<"${EXTRA:-}"
echo "cpu: $(lscpu | sed -n 's/^Model name: *//p'), threads $threads${EXTRA:+, $EXTRA}${TOPOLOGY:+, topology $TOPOLOGY}"
log=$(mktemp)
for r in $(seq "$rounds"); do
  for shape in $shapes; do
    IFS=: read -r p g batch <<<"$shape"
    for side in A B; do
      bin=$a; [ "$side" = B ] && bin=$b
      json=$("$bin" --threads "$threads" bench --topology "${TOPOLOGY:-none}" --reps 1 --prompt-tokens "$p" \
        --gen-tokens "$g" --batch "$batch" "${extra[@]}" --json 2>/dev/null)
      echo "$side $shape $json" | tee -a "$log" | cut -c1-160
    done
  done
done
python3 - "$log" <<'PY'
import json, sys
best = {}
for line in open(sys.argv[1]):
    side, shape, doc = line.split(" ", 2)
    d = json.loads(doc)
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "batch_decode_tokens_per_s"):
        v = d.get(key)
        if v:
            k = (shape, key, side)
            best[k] = max(best.get(k, 0.0), v)
print("| prompt:gen:batch | figure | A | B | B / A |")
print("| --- | --- | ---: | ---: | ---: |")
for shape in dict.fromkeys(k[0] for k in best):
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "batch_decode_tokens_per_s"):
        a, b = best.get((shape, key, "A")), best.get((shape, key, "B"))
        if a and b:
            print(f"| {shape} | {key} | {a:.1f} | {b:.1f} | {b / a:.2f} |")
PY
rm -f "$log"
