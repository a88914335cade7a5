#!/usr/bin/env bash
# The GPU checks (issue 17), for a machine with an NVIDIA GPU and its driver. CI has no GPU: there
# the `cuda` build is linted and tested for its errors only (.ci/run). Run this once per GPU
# machine and put its output in docs/benchmarks.md.
#
#   scripts/gpu-check.sh                  # builds `strata` with `--features cuda`
#   STRATA=path/to/strata MODEL=path/to/SmolLM2-135M-Instruct.Q4_1.gguf scripts/gpu-check.sh
#
# What it checks, against this machine's CPU as the reference:
#   1. the golden text's perplexity through a `cuda[0]` worker (weights as stored, uploaded as
#      f16) and through the mixed route cpu -> cuda[0] -> cpu: within 1% of the CPU's;
#   2. the greedy tokens of the golden prompts through `cuda[0]`: printed beside the CPU's, with
#      the number of prompts whose text is identical (f16 products round differently from the
#      CPU's int8 ones, so a prompt whose top two logits are close may differ late);
#   3. `strata serve` on the mixed route (two worker processes, the TCP ring between the CPU
#      and the GPU), measured from a gRPC client;
#   4. with two GPUs, the same perplexity over two GPU workers, then `strata serve` on them: the
#      hop between them over NCCL, and with `--no-nccl` over TCP (figures of both, and the same
#      greedy text through both);
#   5. speed: `strata bench` on `cuda[0]` and on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
failed=0

MODEL="${MODEL:-default}"
if [ -z "${STRATA:-}" ]; then
  cargo build --release --features cuda
  STRATA="${CARGO_TARGET_DIR:-target}/release/strata"
fi
text=tests/golden/smollm2/ppl_text.txt
prompts=tests/golden/smollm2/prompts.json

echo "== the machine =="
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv || true
gpus=$(nvidia-smi --list-gpus 2>/dev/null | wc -l || echo 0)
lscpu | grep -E 'Model name|^CPU\(s\)' || true

echo "== 1. perplexity of the golden text: CPU, cuda[0], cpu -> cuda[0] -> cpu =="
ppl() { "$STRATA" perplexity --json --model "$MODEL" --topology "$1" --text "$text" | tail -1; }
cpu=$(ppl none); echo "cpu       $cpu"
gpu=$(ppl topologies/gpu/cuda0.yml); echo "cuda[0]   $gpu"
mixed=$(ppl topologies/gpu/mixed.yml); echo "mixed     $mixed"
python3 - "$cpu" "$gpu" "$mixed" <<'EOF'
import json, sys
ref = json.loads(sys.argv[1])["perplexity"]
for name, raw in (("cuda[0]", sys.argv[2]), ("mixed", sys.argv[3])):
    p = json.loads(raw)["perplexity"]
    rel = abs(p - ref) / ref
    print(f"{name}: perplexity {p:.4f} against the CPU's {ref:.4f}: {rel:.2%} {'ok' if rel <= 0.01 else 'FAIL'}")
EOF

echo "== 2. greedy tokens of the golden prompts: CPU against cuda[0] =="
same=0; total=0
while IFS= read -r prompt; do
  a=$("$STRATA" generate --model "$MODEL" --topology none --prompt "$prompt" --max-tokens 32 2>/dev/null)
  b=$("$STRATA" generate --model "$MODEL" --topology topologies/gpu/cuda0.yml --prompt "$prompt" --max-tokens 32 2>/dev/null)
  total=$((total + 1))
  if [ "$a" = "$b" ]; then same=$((same + 1)); echo "same   : $prompt$a"; else printf 'differs: %s\n  cpu : %s\n  cuda: %s\n' "$prompt" "$a" "$b"; fi
done < <(python3 -c 'import json,sys; [print(p["prompt_text"]) for p in json.load(open(sys.argv[1]))["prompts"]]' "$prompts")
echo "identical greedy text: $same of $total prompts"

echo "== 3. strata serve on cpu -> cuda[0] -> cpu =="
port=50091
"$STRATA" serve --model "$MODEL" --topology topologies/gpu/mixed.yml --listen "127.0.0.1:$port" --insecure > /tmp/strata-gpu-serve.log 2>&1 &
serve=$!
trap 'kill $serve 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  grep -q "\"event\":\"ready\"" /tmp/strata-gpu-serve.log 2>/dev/null && break
  kill -0 $serve 2>/dev/null || { cat /tmp/strata-gpu-serve.log; exit 1; }
  sleep 1
done
"$STRATA" bench-serve --addr "127.0.0.1:$port" --prompt-tokens 128 --gen-tokens 64 --reps 2
grep -E "worker loaded|GPU opened" /tmp/strata-gpu-serve.log || true
kill $serve; wait $serve 2>/dev/null || true; trap - EXIT

if [ "$gpus" -ge 2 ]; then
  echo "== 4. two GPU workers: in one process, then served with the NCCL hop and with TCP =="
  echo "cuda[0] + cuda[1]  $(ppl topologies/gpu/two-gpus.yml)"
  grpcurl=$(command -v grpcurl || echo "$HOME/.cache/strata/venv/bin/grpcurl")
  chat='{"messages":[{"role":"user","content":"What is the capital of France?"}],"parameters":{"max_tokens":24,"temperature":0}}'
  # serve_two NAME [GATEWAY FLAGS]: serves two-gpus.yml, prints its figures, keeps its text.
  serve_two() {
    local name=$1; shift
    "$STRATA" serve --model "$MODEL" --topology topologies/gpu/two-gpus.yml --listen "127.0.0.1:$port" --insecure "$@" > "/tmp/strata-gpu-$name.log" 2>&1 &
    serve=$!
    trap 'kill $serve 2>/dev/null || true' EXIT
    for _ in $(seq 1 120); do
      grep -q "\"event\":\"ready\"" "/tmp/strata-gpu-$name.log" 2>/dev/null && break
      kill -0 $serve 2>/dev/null || { cat "/tmp/strata-gpu-$name.log"; exit 1; }
      sleep 1
    done
    local hops
    hops=$(grep -c 'stage hop over NCCL' "/tmp/strata-gpu-$name.log" || true)
    echo "-- $name: $hops hop(s) over NCCL"
    if [ "$name" = nccl ] && [ "$hops" -lt 1 ]; then
      echo "the two GPU workers did not set up an NCCL hop (is libnccl.so loadable?): FAIL"; failed=1
    fi
    "$STRATA" bench-serve --addr "127.0.0.1:$port" --prompt-tokens 128 --gen-tokens 64 --reps 3
    "$STRATA" load --addr "127.0.0.1:$port" --streams 1,16 --gen-tokens 64 --json
    if [ -x "$grpcurl" ]; then
      # The token ids alone (the last message's timings differ from run to run).
      "$grpcurl" -plaintext -d "$chat" "127.0.0.1:$port" strata.v1.Strata/Chat | grep '"id"' > "/tmp/strata-gpu-$name.chat" || true
    fi
    kill $serve; wait $serve 2>/dev/null || true; trap - EXIT
  }
  serve_two nccl
  serve_two tcp --no-nccl
  # NCCL moves the same bytes the TCP frame would: the greedy tokens must be the same.
  if [ -x "$grpcurl" ]; then
    if [ -s /tmp/strata-gpu-nccl.chat ] && cmp -s /tmp/strata-gpu-nccl.chat /tmp/strata-gpu-tcp.chat; then
      echo "greedy chat over the NCCL hop: $(wc -l < /tmp/strata-gpu-nccl.chat) token ids, identical to TCP's: ok"
    else
      echo "greedy chat over the NCCL hop differs from TCP's: FAIL"; diff /tmp/strata-gpu-nccl.chat /tmp/strata-gpu-tcp.chat || true
      failed=1
    fi
  else
    echo "no grpcurl (scripts/setup-test-peers.sh installs it): the NCCL hop's tokens are not compared: FAIL"; failed=1
  fi
else
  echo "== 4. two GPU workers: skipped, this machine has $gpus GPU(s) (an NCCL hop needs two) =="
fi

echo "== 5. speed: strata bench on cuda[0] and on the CPU =="
"$STRATA" bench --model "$MODEL" --topology topologies/gpu/cuda0.yml --prompt-tokens 128 --gen-tokens 128 --reps 3
"$STRATA" bench --model "$MODEL" --topology none --prompt-tokens 128 --gen-tokens 128 --reps 3
exit "$failed"
