#!/usr/bin/env bash
# Per ISQ type on the default model (every decoder linear weight quantized at load, one process,
# 2 threads): load time, weight bytes, peak RSS, prefill and decode tokens/s, and perplexity over
# tests/golden/smollm2/ppl_text.txt. Prints a Markdown table.
# Usage: scripts/bench-isq.sh [TYPES...]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bench-lib.sh
text=tests/golden/smollm2/ppl_text.txt
types=("$@")
[ ${#types[@]} -gt 0 ] || types=(as-stored f32 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q8_1 Q2K Q3K Q4K Q5K Q6K Q8K HQQ4 HQQ8 FP8)
echo "| type | load s | weights MiB | peak RSS MiB | prefill tok/s | decode tok/s | perplexity |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
for t in "${types[@]}"; do
  case $t in
    as-stored) args=() ;;
    f32) args=(--dtype f32) ;;
    *) args=(--isq "$t") ;;
  esac
  b=$("$strata" --threads 2 bench --json --topology none "${args[@]}" --prompt-tokens 128 --gen-tokens 128 --reps 3 2>/dev/null)
  p=$("$strata" --threads 2 perplexity --json --topology none "${args[@]}" --text "$text" 2>/dev/null)
  python3 - "$t" "$b" "$p" <<'PY'
import json, sys
t, b, p = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
mib = 1 << 20
print(f"| {t} | {b['load_seconds']:.2f} | {b['weight_bytes']/mib:.1f} | {b['peak_rss_bytes']/mib:.1f} | "
      f"{b['prefill_tokens_per_s']:.0f} | {b['decode_tokens_per_s']:.1f} | {p['perplexity']:.3f} |")
PY
done
