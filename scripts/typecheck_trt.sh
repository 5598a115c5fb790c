#!/usr/bin/env bash
# Static check of the code that talks to TensorRT and the CUDA runtime, against the real APIs, on a
# machine without a GPU:
#
#   1. mypy over the TensorRT build and backend modules (list below) with `tensorrt-stubs`
#      (TensorRT's Python API as type stubs; installed with --no-deps, its dependency on the TensorRT
#      wheel cannot be met without CUDA) — catches a misspelt method, a wrong argument, a removed API;
#   2. scripts/check_cudart_calls.py: every CUDA runtime name those files use (`cuda("cudaMalloc",
#      …)`, `rt.cudaMemcpyKind…`) exists in the real cuda.bindings.runtime with that many arguments
#      (cuda-bindings installs and imports on CPU; its Cython module has no stubs mypy could read).
#
# It runs in an environment of its own ($TRT_STUBS_VENV, default .venv-trt-stubs), never the project's:
# installed beside the project, the stubs' `tensorrt` package makes `import tensorrt` succeed and
# ModelOpt then fails (module 'tensorrt' has no attribute 'Logger'). The venv is made once per set of
# pins (a stamp records them); a second run only runs the checks. Arguments: files to check instead.
# Exit status: 0 clean, 1 type/API errors, 3 the environment could not be made (e.g. no package index).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV="${TRT_STUBS_VENV:-.venv-trt-stubs}"
PYTHON="${PYTHON:-python3}"
# set -o pipefail: a failing pip fails the pipeline through the filter of its expected complaint.
FILES=("$@")
# The TensorRT build and backend, and the modules that call TensorRT or the CUDA runtime for them
# (those present: the build side may be split into more modules).
if [ ${#FILES[@]} -eq 0 ]; then
  for f in engine_build/trt/build.py engine_build/trt/tools.py service/backends/tensorrt.py \
    service/backends/trt_plans.py service/backends/trt_instances.py service/backends/cuda_rt.py \
    service/hardware.py; do
    if [ -f "$f" ]; then FILES+=("$f"); fi
  done
fi
STUBS=("tensorrt-stubs==10.13.*")
# The checked modules import these (service.manifest uses pydantic): installed so mypy sees real types.
TOOLS=("mypy==1.*" "numpy" "cuda-bindings==13.*" "pydantic==2.*")

want="$({ printf '%s\n' "${STUBS[@]}" "${TOOLS[@]}"; "$PYTHON" -c 'import sys; print(sys.version)'; } \
  | sha256sum | cut -d' ' -f1)"
stamp="$VENV/.typecheck-trt-installed"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "==> making $VENV (tensorrt-stubs, mypy, cuda-bindings): once" >&2
  rm -rf "$VENV"
  if ! { "$PYTHON" -m venv "$VENV" \
    && "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps "${STUBS[@]}" \
    && "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${TOOLS[@]}" 2>&1 \
      | { grep -v -e "tensorrt-stubs .* requires" -e "dependency resolver does not" >&2 || true; }; }; then
    echo "typecheck_trt: could not make $VENV (no package index?)" >&2
    rm -rf "$VENV"
    exit 3
  fi
  # The stubs install as plain `tensorrt/`+`tensorrt_bindings/` .pyi packages without PEP 561's py.typed
  # marker, which mypy then refuses to read ("missing library stubs"): mark them in this venv.
  site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  touch "$site/tensorrt/py.typed" "$site/tensorrt_bindings/py.typed"
  # ...and they have a few lines Python cannot parse (pybind11-stubgen output): repaired in place.
  "$VENV/bin/python" scripts/lib/repair_stubs.py "$site"/tensorrt/*.pyi "$site"/tensorrt_bindings/*.pyi
  echo "$want" >"$stamp"
fi

# Settings (which imports have no stubs) in scripts/mypy_trt.ini; the cache in the venv keeps reruns quick.
# Both checks run (and report) even when the first fails.
status=0
"$VENV/bin/python" -m mypy --config-file scripts/mypy_trt.ini --cache-dir "$VENV/.mypy_cache" \
  --no-error-summary "${FILES[@]}" || status=1
"$VENV/bin/python" scripts/check_cudart_calls.py "${FILES[@]}" || status=1
if [ "$status" -eq 0 ]; then
  echo "typecheck_trt: ${FILES[*]} clean against tensorrt-stubs and cuda.bindings.runtime" >&2
fi
exit "$status"
