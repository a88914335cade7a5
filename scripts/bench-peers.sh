#!/usr/bin/env bash
# Strata's single-process speed against llama.cpp's and ik_llama.cpp's `llama-bench`, on the
# same GGUF files and thread counts, in one interleaved run (llama.cpp, Strata, ik_llama.cpp,
# Strata, per round), then a table of the best round of each. Figures, not tests.
#
# Usage:  LLAMA_BENCH=... IK_LLAMA_BENCH=... [LLAMA_QUANTIZE=...] scripts/bench-peers.sh [ROUNDS]
#   LLAMA_BENCH     llama.cpp's llama-bench      (scripts/get-llama-bench.sh DEST)
#   IK_LLAMA_BENCH  ik_llama.cpp's llama-bench   (scripts/get-ik-llama-bench.sh SRC DEST)
#   LLAMA_QUANTIZE  llama.cpp's llama-quantize: with it, Q4_0, Q8_0 and F32 files are made from
#                   the stored Q4_1 GGUF (`--allow-requantize`), and every engine reads them.
#   TYPES           default "Q4_1 Q4_0 Q8_0 F32" (those with a file); THREADS default "1 2".
#   LONG=1          also a 4,000-token context: prefill of 4,000 tokens, then 64 decoded after it
#                   (llama.cpp `-p 4000` and `-n 64 -d 4000`, ik_llama.cpp `-p 4000` and
#                   `-gp 4000,64`, Strata `--prompt-tokens 4000 --gen-tokens 64`), 2 threads.
#   STEP16=1        also a step of 16 rows against a step of one, for each type and thread
#                   count: each engine's forward of a 16-token prompt in one step (`-p 16`,
#                   `--prompt-tokens 16`; the peers' logits of the last row only, as Strata's)
#                   against its decode of 64 tokens; and Strata's decode of 16 sequences at once
#                   (`--batch 16`: every row's logits and sample). Printed as milliseconds a
#                   step and the ratio, the kernels issue's "step of 16 at most 2x a step of one".
#   PEER_HUGE_PAGES=1  the peers' weights on transparent huge pages too, as Strata keeps its
#                   own: read into memory instead of mapped from the file (llama.cpp
#                   `-lm none`, ik_llama.cpp `-mmp 0`), with glibc asked to back large blocks
#                   with huge pages (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`).
# Needs:  python3. Any engine whose variable is unset is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
source scripts/bench-lib.sh
model=$("$strata" fetch-model 2>/dev/null)
dir=$(dirname "$model")
out=$(mktemp)
trap 'rm -f "$out"' EXIT

declare -A file=([Q4_1]="$model")
if [ -n "${LLAMA_QUANTIZE:-}" ]; then
  for t in Q4_0 Q8_0 F32; do
    f="$dir/SmolLM2-135M-Instruct.$t.from-Q4_1.gguf"
    [ -s "$f" ] || "$LLAMA_QUANTIZE" --allow-requantize "$model" "$f" "$t" >/dev/null 2>&1
    file[$t]=$f
  done
fi

# One run of a peer: prints `engine type threads prefill decode` from llama-bench's JSON.
peer() { # name binary type threads args...
  local name=$1 bin=$2 type=$3 threads=$4
  shift 4
  local huge=() tunables=${GLIBC_TUNABLES:-}
  if [ -n "${PEER_HUGE_PAGES:-}" ]; then
    tunables=glibc.malloc.hugetlb=1
    case $name in
      llama.cpp*) huge=(-lm none) ;;
      ik_llama.cpp*) huge=(-mmp 0) ;;
    esac
  fi
  GLIBC_TUNABLES=$tunables "$bin" -m "${file[$type]}" -t "$threads" "${huge[@]}" "$@" -o json 2>/dev/null | python3 -c '
import json, sys
name, typ, threads = sys.argv[1:4]
runs = json.load(sys.stdin)
pp = [r["avg_ts"] for r in runs if r["n_prompt"] and not r["n_gen"]]
# Decode after a prompt (ik_llama.cpp `-gp`: a `tg64@pp4000` row) before plain decode rows.
tg = [r["avg_ts"] for r in runs if r["n_gen"] and r["n_prompt"]] or [r["avg_ts"] for r in runs if r["n_gen"]]
print(name, typ, threads, pp[0] if pp else 0, tg[0] if tg else 0)' "$name" "$type" "$threads" | tee -a "$out"
}

ours() { # name type threads args...
  local name=$1 type=$2 threads=$3
  shift 3
  "$strata" --threads "$threads" bench --model "${file[$type]}" --topology none "$@" --json 2>/dev/null |
    python3 -c '
import json, sys
name, typ, threads = sys.argv[1:4]
r = json.load(sys.stdin)
print(name, typ, threads, r["prefill_tokens_per_s"], r["decode_tokens_per_s"], r["batch_decode_tokens_per_s"], r["peak_rss_bytes"] / 2**20, r["cpu_kernels"].replace(" ", "_"))' "$name" "$type" "$threads" | tee -a "$out"
}

for round in $(seq 1 "$rounds"); do
  echo "== round $round"
  for type in ${TYPES:-Q4_1 Q4_0 Q8_0 F32}; do
    [ -n "${file[$type]:-}" ] || continue
    for threads in ${THREADS:-1 2}; do
      [ -z "${LLAMA_BENCH:-}" ] || peer llama.cpp "$LLAMA_BENCH" "$type" "$threads" -p 128 -n 128 -r 3
      ours strata "$type" "$threads" --prompt-tokens 128 --gen-tokens 128 --reps 3 --batch 0
      [ -z "${IK_LLAMA_BENCH:-}" ] || peer ik_llama.cpp "$IK_LLAMA_BENCH" "$type" "$threads" -p 128 -n 128 -r 3
      ours strata "$type" "$threads" --prompt-tokens 128 --gen-tokens 128 --reps 3 --batch 16
    done
  done
  if [ -n "${STEP16:-}" ]; then
    for type in ${TYPES:-Q4_1 Q4_0 Q8_0 F32}; do
      [ -n "${file[$type]:-}" ] || continue
      for threads in ${THREADS:-1 2}; do
        [ -z "${LLAMA_BENCH:-}" ] || peer llama.cpp-16 "$LLAMA_BENCH" "$type" "$threads" -p 16 -n 64 -r 3
        ours strata-16 "$type" "$threads" --prompt-tokens 16 --gen-tokens 64 --reps 3 --batch 16
        [ -z "${IK_LLAMA_BENCH:-}" ] || peer ik_llama.cpp-16 "$IK_LLAMA_BENCH" "$type" "$threads" -p 16 -n 64 -r 3
        ours strata-16 "$type" "$threads" --prompt-tokens 16 --gen-tokens 64 --reps 3 --batch 16
      done
    done
  fi
  if [ -n "${LONG:-}" ]; then
    [ -z "${LLAMA_BENCH:-}" ] || peer llama.cpp-4k "$LLAMA_BENCH" Q4_1 2 -p 4000 -n 0 -r 1
    [ -z "${LLAMA_BENCH:-}" ] || peer llama.cpp-4k "$LLAMA_BENCH" Q4_1 2 -p 0 -n 64 -d 4000 -r 1
    ours strata-4k Q4_1 2 --prompt-tokens 4000 --gen-tokens 64 --reps 1 --batch 0
    [ -z "${IK_LLAMA_BENCH:-}" ] || peer ik_llama.cpp-4k "$IK_LLAMA_BENCH" Q4_1 2 -p 4000 -n 0 -r 1
    [ -z "${IK_LLAMA_BENCH:-}" ] || peer ik_llama.cpp-4k "$IK_LLAMA_BENCH" Q4_1 2 -p 0 -n 0 -gp 4000,64 -r 1
    ours strata-4k Q4_1 2 --prompt-tokens 4000 --gen-tokens 64 --reps 1 --batch 0
  fi
done

echo "== best of $rounds rounds (tok/s)"
python3 - "$out" <<'EOF'
import sys
best = {}
for line in open(sys.argv[1]):
    f = line.split()
    if len(f) < 5:
        continue
    key = (f[0], f[1], f[2])
    b = best.setdefault(key, [0.0, 0.0, 0.0, None, ""])
    b[0] = max(b[0], float(f[3]))
    b[1] = max(b[1], float(f[4]))
    if len(f) >= 8:
        b[2] = max(b[2], float(f[5]))
        b[3] = float(f[6]) if b[3] is None else min(b[3], float(f[6]))
        b[4] = f[7].replace("_", " ")
steps = {k: v for k, v in best.items() if k[0].endswith("-16")}
print("| engine | weights | threads | prefill | decode | batch of 16 (all) | peak RSS MiB |")
print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
for (engine, typ, threads), (pp, tg, batch, rss, kernels) in sorted(best.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
    if (engine, typ, threads) in steps:
        continue
    print(f"| {engine} | {typ} | {threads} | {pp:.1f} | {tg:.1f} | {batch:.1f} | {'' if rss is None else f'{rss:.0f}'} |")
if steps:
    # A step's time from the best rates: 16 rows of a prompt at `pp` tok/s, one row at `tg`,
    # 16 sequences at `batch` tok/s in all.
    print()
    print("| engine | weights | threads | step of 1 ms | 16 prompt rows ms (ratio) | 16 sequences ms (ratio) |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for (engine, typ, threads), (pp, tg, batch, _, _) in sorted(steps.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        one = 1e3 / tg if tg else float("nan")
        rows = 16e3 / pp if pp else float("nan")
        seqs = f"{16e3 / batch:.2f} ({16e3 / batch / one:.1f}x)" if batch else ""
        print(f"| {engine[:-3]} | {typ} | {threads} | {one:.2f} | {rows:.2f} ({rows / one:.1f}x) | {seqs} |")
EOF
