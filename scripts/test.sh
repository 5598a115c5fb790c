#!/usr/bin/env bash
# The README's test command. On a fresh machine it makes .venv, installs the project with every
# extra the tests need (CPU only), installs the deployment linters, then runs the whole suite; then
# it proves the serving runtime needs no torch: a second venv (.venv-serve) with only the `serve`,
# `dev` and `client` extras runs the runtime, HTTP and client tests (tests that need torch skip).
# Extra arguments go to the first pytest run only, and skip the serve-only stage
# (e.g. scripts/test.sh -k http -x).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/venv.sh
ensure_venv "serve,build,dev,client,openvino"
if [ -f .ci/install-deploy-tools.sh ]; then
  bash .ci/install-deploy-tools.sh
fi
rc=0
python -m pytest -q -p no:cacheprovider "$@" || rc=$?
if [ $# -gt 0 ] || [ -n "${GENDR_SKIP_SERVE_ONLY:-}" ]; then
  exit $rc
fi
echo "==> serve-only stage: tests/service and tests/gendr_client without torch (.venv-serve)" >&2
VENV=.venv-serve ensure_venv "serve,dev,client"
if python -c 'import torch' 2>/dev/null; then
  echo "serve-only stage: torch is importable in .venv-serve" >&2
  exit 1
fi
python -m pytest -q -p no:cacheprovider tests/service tests/gendr_client || rc=$?
exit $rc
