#!/usr/bin/env bash
# The README's test command. On a fresh machine it makes .venv, installs the project with every
# extra the tests need (CPU only), installs the deployment linters, then runs the whole suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -k http -x).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/venv.sh
ensure_venv "serve,build,dev,client"
if [ -f .ci/install-deploy-tools.sh ]; then
  bash .ci/install-deploy-tools.sh
fi
exec python -m pytest -q -p no:cacheprovider "$@"
