#!/usr/bin/env bash
# Every GPU check in one run, sized for a 15-minute GPU lease (under 8 minutes on an H100/H200).
# Run it from the repository root; results land in $OUT (or ./gpu-out), each JSON rewritten after
# every row so a timeout loses nothing:
#
#   bash benchmarks/fetch_gpu_wheels.sh      # once, on the dev machine: wheels the GPU machine lacks → .whl/
#   bash benchmarks/gpu_checks.sh            # on the GPU machine (carry .whl)
#   bash benchmarks/gpu_checks.sh --full     # + torch.compile rows (much longer)
#   bash benchmarks/gpu_checks.sh --dry-run  # on a CPU: the same scripts and code paths, tiny model
#
# The GPU machine has torch (CUDA), onnx, onnxruntime (CPU), pillow and prometheus-client, but no
# TensorRT, ModelOpt, scikit-image, diffusers, pydantic or FastAPI: the wheels in .whl/ are installed
# into /tmp/site first. A failing check does not stop the others; the exit code says whether all passed.
# The dry run runs the engine check twice: as this machine has it, and without ModelOpt and
# scikit-image (as the GPU machine has it), so the "tool missing" path runs on every dry run too.
# Last, the summary ($OUT/gpu_checks_summary.json): rows per check, failed rows, and which backends
# were exercised on the GPU and which were not (a dry run exercises none).
set -uo pipefail
cd "$(dirname "$0")/.."
mode="${1:-}"
OUT="${OUT:-gpu-out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv >"$OUT/gpu.csv" 2>&1 || true
rc=0
run() {
  local name="$1"; shift
  echo "== $name: $*"
  if ! timeout "${CHECK_TIMEOUT:-300}" "$@" >"$OUT/$name.log" 2>&1; then
    echo "   $name FAILED (see $OUT/$name.log)"; rc=1
  fi
  tail -n 4 "$OUT/$name.log"
}
torch_flags=() other_flags=()
case "$mode" in
  --dry-run) torch_flags=(--dry-run) other_flags=(--dry-run) ;;
  --full) torch_flags=(--full) ;;
  "") ;;
  *) echo "usage: $0 [--dry-run|--full]" >&2; exit 2 ;;
esac
run torch "$PY" benchmarks/gpu_check_torch.py "${torch_flags[@]}" --out "$OUT"
run batcher "$PY" benchmarks/gpu_check_batcher.py "${other_flags[@]}" --out "$OUT"
run engine "$PY" benchmarks/gpu_check_engine.py "${other_flags[@]}" --out "$OUT"
if [ "$mode" = "--dry-run" ]; then
  run engine-without-tools "$PY" benchmarks/gpu_check_engine.py --dry-run --without modelopt --without skimage --out "$OUT"
fi
echo "== summary"
"$PY" benchmarks/_gpu_report.py "$OUT" | tee "$OUT/summary.txt" || rc=1
exit $rc
