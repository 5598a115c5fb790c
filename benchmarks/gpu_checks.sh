#!/usr/bin/env bash
# Every GPU check in one run, for a session that is lent a GPU machine (about 15 minutes in all).
# Run it there from the repository root; results land in $OUT (or ./gpu-out):
#
#   bash benchmarks/gpu_checks.sh            # full set, ~8 min on an H100
#   QUICK=1 bash benchmarks/gpu_checks.sh    # smaller matrix, ~3 min
#
# The GPU machine has torch (CUDA), onnx, onnxruntime (CPU), pillow and prometheus-client, but no
# TensorRT, diffusers or FastAPI: carry their wheels in .whl/ (see /work/.library/device/README.md)
# and this script installs them into /tmp/site first. Each check writes its own JSON and log, and a
# failing check does not stop the others.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}:$PWD"
fi
export PYTHONPATH="${PYTHONPATH:-}:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv >"$OUT/gpu.csv" 2>&1
rc=0
run() {
  local name="$1"; shift
  echo "== $name: $*"
  if ! timeout "${CHECK_TIMEOUT:-300}" "$@" >"$OUT/$name.log" 2>&1; then
    echo "   $name FAILED (see $OUT/$name.log)"; rc=1
  fi
  tail -n 5 "$OUT/$name.log"
}
if [ -n "${QUICK:-}" ]; then
  run torch python3 benchmarks/gpu_check_torch.py --tiles 512 --batches 1 4 --precisions fp16 --out "$OUT"
else
  run torch python3 benchmarks/gpu_check_torch.py --out "$OUT"
fi
if python3 -c "import tensorrt" 2>/dev/null; then
  run engine python3 benchmarks/gpu_check_engine.py --out "$OUT/gpu_check_engine.json"
else
  echo "== engine: skipped (no tensorrt package; carry its wheels in .whl/)"
fi
exit $rc
