#!/usr/bin/env bash
# Builds ik_llama.cpp's `llama-bench` from a source checkout SRC into DEST/bin, records the commit it
# built in DEST/COMMIT, and prints the binary's path. Idempotent: if DEST/bin/llama-bench runs and
# DEST/COMMIT matches SRC's current commit, prints the path and exits without building.
#
# Usage:   scripts/get-ik-llama-bench.sh SRC DEST
#          JOBS=2 nice -n 10 scripts/get-ik-llama-bench.sh SRC DEST     (on a shared machine)
# Then:    DEST/bin/llama-bench -m MODEL.gguf -t 2 -p 128 -n 128 -r 5
#
# SRC is an ik_llama.cpp work tree (it has no git submodules). From a local bare mirror, e.g.
#   git clone --no-checkout MIRROR SRC && cd SRC &&
#   git sparse-checkout set --no-cone '/*' '!/models/ggml-vocab-*.gguf' \
#       '!/examples/server/public_llamacpp/index_llamacpp.html' '!/examples/server/webui/dist/index.html' &&
#   git checkout -f HEAD
# (the sparse patterns skip large test/web-UI files that a mirror may lack; llama-bench needs none).
#
# Build:  GGML_NATIVE=ON (-march=native), as the benchmark asks for ik_llama.cpp's own best build.
#         -march=native follows CPUID, which can claim more than the kernel lets a process use; so any
#         of AVX-VNNI, AVX512-FP16, AVX-IFMA, AVX-VNNI-INT8 and AMX that the compiler would enable but
#         /proc/cpuinfo does not list is turned off again with -mno-<isa> (GCC keeps an explicit -mno-X
#         whatever -march says). On an AMD EPYC Zen 4 gcc 12 picks znver3 + AVX-512 (F/CD/BW/DQ/VL,
#         VBMI, VBMI2, VNNI, BF16, IFMA, BITALG, VPOPCNTDQ), no AVX-VNNI, no AMX: nothing to undo.
#         ik_llama.cpp has no AMX code paths, so AMX needs no cmake switch. CURL off, no tests, no
#         server, static libraries (one self-contained binary).
# Needs:  a C/C++ compiler, git (for DEST/COMMIT), python3 with venv+pip only if cmake/ninja are
#         missing (then they come from PyPI into DEST/venv). About 24 minutes on 2 busy cores (JOBS
#         defaults to nproc): ik_llama.cpp's iqk kernels are large.
set -euo pipefail

src=${1:?usage: get-ik-llama-bench.sh SRC DEST}
dest=${2:?usage: get-ik-llama-bench.sh SRC DEST}
jobs=${JOBS:-$(nproc)}

[ -f "$src/CMakeLists.txt" ] && [ -d "$src/ggml/src/iqk" ] ||
  { echo "get-ik-llama-bench.sh: $src is not an ik_llama.cpp source tree" >&2; exit 1; }
src=$(cd "$src" && pwd)
mkdir -p "$dest"
dest=$(cd "$dest" && pwd)
bin="$dest/bin/llama-bench"

if git -C "$src" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  commit=$(git -C "$src" rev-parse HEAD)
  # sparse-checkout exclusions are not local changes; anything else is, and is recorded as such
  [ -z "$(git -C "$src" status --porcelain --untracked-files=no)" ] || commit="$commit-dirty"
else
  commit="unknown (SRC is not a git checkout)"
fi

if [ -x "$bin" ] && [ "$(cat "$dest/COMMIT" 2>/dev/null)" = "$commit" ] && "$bin" --help >/dev/null 2>&1; then
  echo "$bin"
  exit 0
fi

if ! command -v cmake >/dev/null || ! command -v ninja >/dev/null; then
  python3 -m venv "$dest/venv" >&2
  "$dest/venv/bin/pip" install -q --disable-pip-version-check cmake ninja >&2
  export PATH="$dest/venv/bin:$PATH"
fi

# ISA extensions that -march=native may turn on: gcc's name, /proc/cpuinfo's name.
cc=${CC:-cc}
native=$("$cc" -march=native -Q --help=target 2>/dev/null || true)
no_flags=""
for pair in avxvnni:avx_vnni avx512fp16:avx512_fp16 avxifma:avx_ifma avxvnniint8:avx_vnni_int8 \
            amx-tile:amx_tile amx-int8:amx_int8 amx-bf16:amx_bf16 amx-fp16:amx_fp16; do
  isa=${pair%%:*} flag=${pair#*:}
  if grep -Eq -- "^[[:space:]]+-m$isa[[:space:]]+\[enabled\]" <<<"$native" && ! grep -qw "$flag" /proc/cpuinfo; then
    no_flags="$no_flags -mno-$isa"
  fi
done
[ -z "$no_flags" ] || echo "get-ik-llama-bench.sh: -march=native claims ISAs /proc/cpuinfo lacks; adding:$no_flags" >&2

cmake -S "$src" -B "$dest/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_C_FLAGS="$no_flags" -DCMAKE_CXX_FLAGS="$no_flags" \
  -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON -DGGML_AVXVNNI=OFF -DGGML_CCACHE=OFF \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_EXAMPLES=ON \
  >"$dest/cmake-configure.log"
cmake --build "$dest/build" --target llama-bench -j"$jobs" >"$dest/cmake-build.log"

mkdir -p "$dest/bin"
cp -f "$dest/build/bin/llama-bench" "$bin"
"$bin" --help >/dev/null
echo "$commit" >"$dest/COMMIT"
echo "$bin"
