#!/usr/bin/env bash
# Builds the `strata` binary for a container image and copies it to OUT/strata.
#
#   deploy/docker/build.sh cpu  OUT    # what deploy/docker/Dockerfile runs
#   deploy/docker/build.sh cuda OUT    # what deploy/docker/Dockerfile.cuda runs (no CUDA toolkit needed:
#                                      # cudarc loads the driver, cuBLAS and NCCL at run time)
#
# The Dockerfiles run exactly this script, and `.ci/run` runs it too (no container daemon runs
# on the CI machines), so the image's build step is proven on every change. The binary is built
# for generic x86-64: the kernels pick their instructions at start from the running CPU, so one
# image runs the fast path on every machine.
set -euo pipefail
variant=${1:?usage: build.sh cpu|cuda OUT}
out=${2:?usage: build.sh cpu|cuda OUT}
cd "$(dirname "$0")/../.."

features=()
case "$variant" in
  cpu) ;;
  cuda) features=(--features cuda) ;;
  *) echo "build.sh: unknown variant \`$variant\` (expected cpu or cuda)" >&2; exit 2 ;;
esac

# No `-C target-cpu=native`: the image must run on any x86-64 node, not only the build host.
unset RUSTFLAGS
cargo build --release --locked --bin strata "${features[@]}"
target="${CARGO_TARGET_DIR:-target}"
mkdir -p "$out"
# Stripped: the line tables the release profile keeps for profiling are not needed in an image.
install -m 0755 --strip "$target/release/strata" "$out/strata"
"$out/strata" --version
