#!/usr/bin/env bash
# Builds llama.cpp's own `llama-bench` (the reference CPU figures for a GGUF) into DEST/bin and prints
# its path. Idempotent: if DEST/bin/llama-bench already exists and runs, prints the path and exits.
#
# Usage:   scripts/get-llama-bench.sh DEST          (e.g. DEST=$HOME/.cache/peers/llama.cpp)
#          JOBS=2 nice -n 10 scripts/get-llama-bench.sh DEST     (on a shared machine)
# Then:    DEST/bin/llama-bench -m MODEL.gguf -t 2 -p 128 -n 128 -r 5
#
# Source: the llama.cpp tree vendored in the PyPI sdist of llama-cpp-python==0.3.36 (upstream
# ggml-org/llama.cpp@0c1e57098, per the sdist's CHANGELOG), so only PyPI has to be reachable.
# Build:  GGML_NATIVE=OFF with explicit ISA flags read from /proc/cpuinfo: AVX2/FMA/F16C/BMI2,
#         AVX-512 (F, VBMI, VNNI, BF16) where the CPU has them; AVX-VNNI (the VEX form) only where
#         the CPU has `avx_vnni` (AMD Zen 4 has AVX512-VNNI but not AVX-VNNI: enabling it gives
#         SIGILL); AMX off (llama.cpp's AMX path crashes on some of these machines).
#         Static libraries (one self-contained binary), no server/tests/examples, no OpenSSL.
# Needs:  python3 (venv, pip) and a C/C++ compiler; cmake and ninja come from PyPI into DEST/venv
#         unless the system has both. About 8 minutes on 2 busy cores (JOBS defaults to nproc).
set -euo pipefail

dest=${1:?usage: get-llama-bench.sh DEST}
version=0.3.36
upstream_commit=0c1e570
jobs=${JOBS:-$(nproc)}

mkdir -p "$dest"
dest=$(cd "$dest" && pwd)
bin="$dest/bin/llama-bench"
if [ -x "$bin" ] && "$bin" --help >/dev/null 2>&1; then
  echo "$bin"
  exit 0
fi

# Tools: system cmake+ninja if both are there, else a venv from PyPI (scikit-build-core is needed
# by `pip download`, which prepares the sdist's metadata).
python3 -m venv "$dest/venv" >&2
"$dest/venv/bin/pip" install -q --disable-pip-version-check scikit-build-core >&2
if ! command -v cmake >/dev/null || ! command -v ninja >/dev/null; then
  "$dest/venv/bin/pip" install -q --disable-pip-version-check cmake ninja >&2
fi
export PATH="$dest/venv/bin:$PATH"

sdist="$dest/src/llama_cpp_python-$version.tar.gz"
src="$dest/src/llama_cpp_python-$version/vendor/llama.cpp"
if [ ! -f "$sdist" ]; then
  "$dest/venv/bin/pip" download -q --disable-pip-version-check --no-deps --no-build-isolation \
    "llama-cpp-python==$version" -d "$dest/src" >&2
fi
if [ ! -f "$src/CMakeLists.txt" ]; then
  tar -xzf "$sdist" -C "$dest/src"
fi

has() { grep -qw "$1" /proc/cpuinfo && echo ON || echo OFF; }
cmake -S "$src" -B "$dest/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF \
  -DGGML_AVX="$(has avx)" -DGGML_AVX2="$(has avx2)" -DGGML_FMA="$(has fma)" -DGGML_F16C="$(has f16c)" \
  -DGGML_BMI2="$(has bmi2)" \
  -DGGML_AVX512="$(has avx512f)" -DGGML_AVX512_VBMI="$(has avx512vbmi)" \
  -DGGML_AVX512_VNNI="$(has avx512_vnni)" -DGGML_AVX512_BF16="$(has avx512_bf16)" \
  -DGGML_AVX_VNNI="$(has avx_vnni)" \
  -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
  -DLLAMA_BUILD_COMMIT="$upstream_commit" \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
  -DLLAMA_BUILD_TOOLS=ON -DLLAMA_OPENSSL=OFF >"$dest/cmake-configure.log"
cmake --build "$dest/build" --target llama-bench -j"$jobs" >"$dest/cmake-build.log"

mkdir -p "$dest/bin"
cp -f "$dest/build/bin/llama-bench" "$bin"
"$bin" --help >/dev/null
echo "llama-cpp-python $version sdist, vendor/llama.cpp = ggml-org/llama.cpp@$upstream_commit" >"$dest/VERSION"
echo "$bin"
