#!/usr/bin/env bash
# Downloads into .whl/ the wheels the GPU machine lacks (it has torch, onnx, onnxruntime, pillow and
# prometheus-client, Python 3.12): diffusers, pydantic(-settings) and their missing dependencies, for
# CPython 3.12 manylinux x86_64. Carry .whl with the device tool; gpu_checks.sh installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any \
  -d .whl diffusers pydantic pydantic-settings safetensors huggingface-hub tqdm
# what the GPU machine already has (and must keep: its torch is the CUDA build)
rm -f .whl/torch-* .whl/torchvision-* .whl/nvidia_* .whl/triton-* .whl/numpy-* .whl/onnx-* \
  .whl/onnxruntime-* .whl/pillow-* .whl/sympy-* .whl/networkx-* .whl/mpmath-* .whl/jinja2-* .whl/markupsafe-* \
  .whl/protobuf-* .whl/setuptools-* .whl/ml_dtypes-*  # onnx's own: a newer copy would shadow them
du -sh .whl  # ~20 MB: well inside the device tool's 64 MiB carry limit
