"""The GPU image's TensorRT pairing (issue 24, item 7): onnxruntime-gpu's CUDA-13 wheels link TensorRT 10
(ONNX Runtime issue 32278) while the image carries TensorRT 11 for our backend, so ONNX Runtime's TensorRT
provider is deleted from the images that install onnxruntime-gpu, and docs/export.md states the pair the
Dockerfile pins (read from the Dockerfile, so the two cannot drift)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def _stage(text: str, name: str) -> str:
    """One stage's instructions, continuation lines joined."""
    joined = text.replace("\\\n", " ")
    m = re.search(rf"^FROM \S+ AS {name}$(.*?)(?=^FROM |\Z)", joined, re.M | re.S)
    assert m, name
    return m.group(1)


def test_images_with_onnxruntime_gpu_ship_no_ort_tensorrt_provider() -> None:
    text = (ROOT / "Dockerfile").read_text()
    for stage in ("gpu-venv", "build"):
        body = _stage(text, stage)
        assert "onnxruntime-gpu==" in body, stage
        install = body.index("onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}")
        delete = body.find("glob('libonnxruntime_providers_tensorrt*')]")
        assert delete > install and "p.unlink()" in body[install:], f"{stage}: the provider is not deleted"
    assert "ORT TensorRT provider still shipped" in _stage(text, "gpu-venv")  # the build checks it


def test_export_doc_states_the_pair_the_dockerfile_pins() -> None:
    text = (ROOT / "Dockerfile").read_text()
    trt = re.search(r"^ARG TENSORRT_VERSION=(\S+)$", text, re.M).group(1)  # type: ignore[union-attr]
    ort = re.search(r"^ARG ONNXRUNTIME_GPU_VERSION=(\S+)$", text, re.M).group(1)  # type: ignore[union-attr]
    doc = (ROOT / "docs" / "export.md").read_text()
    section = doc[doc.index("### ONNX Runtime's TensorRT provider") :]
    section = section[: section.index("\n## ")]
    assert f"TensorRT {trt}" in section and f"onnxruntime-gpu {ort}" in section
    assert "libnvinfer.so.10" in section and "32278" in section and "onnxruntime-trt" in section
