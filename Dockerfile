# syntax=docker/dockerfile:1.7
#
# gendr-serve images. Targets:
#   gpu    (default) the serving image: CUDA runtime + cuDNN, TensorRT runtime, ONNX Runtime GPU (its
#          CUDA provider; not its TensorRT provider, which links TensorRT 10: see ONNXRUNTIME_GPU_VERSION).
#          No torch, no compiler. Runs `gendr-serve`.
#   cpu    the serving image for machines without a GPU: ONNX Runtime CPU, or OpenVINO bf16 (auto).
#   build  the export toolchain (torch, diffusers, ModelOpt, ONNX, TensorRT builder): runs
#          `gendr-build` (export, quantize, engine). Build engines with it *on the GPU they will
#          run on*, with the same TENSORRT_VERSION as the gpu image.
#
#   docker build -t gendr-serve:0.1.0 .                          # gpu
#   docker build --target cpu -t gendr-serve:0.1.0-cpu .
#   docker build --target build -t gendr-serve-build:0.1.0 .
#
# No weights or engines are baked in: the model repository is a volume at /models (a bind mount
# in docker-compose.yml, a PersistentVolumeClaim on Kubernetes). See docs/deploy.md.

# Pinned bases (written out in each FROM so linters can check the tags):
#   nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04  CUDA 13.0 - TensorRT 11 and onnxruntime-gpu >= 1.27
#                                                  are built for it; needs NVIDIA driver >= 580
#   python:3.12.11-slim-bookworm                   the CPU variant
# TensorRT engines only load in the TensorRT version that built them: the gpu and build targets
# share this pin (and the model manifest records it; the service refuses a mismatch).
ARG TENSORRT_VERSION=11.4.0.106
# ONNX Runtime's TensorRT provider is NOT shipped (its library is deleted after the install below): the
# onnxruntime-gpu CUDA-13 wheels link TensorRT 10 (libnvinfer.so.10, libnvonnxparser.so.10; reported
# for 1.29.0 in ONNX Runtime issue 32278, whose fix had not been released), no release is known to link
# TensorRT 11, and one venv cannot hold two TensorRT majors (same wheel names). So the pair here is
# TensorRT 11.4 for our `tensorrt` backend + onnxruntime-gpu 1.31.1 for `onnxruntime-cuda` only;
# `onnxruntime-trt` fails to load in this image (docs/export.md, "ONNX Runtime's TensorRT provider").
ARG ONNXRUNTIME_GPU_VERSION=1.31.1
ARG CUDA_PYTHON_VERSION=13.0.3
# TensorRT's library wheels (tensorrt-cu13-libs) are served from NVIDIA's index; the PyPI entry is
# a placeholder that fetches from there anyway. Point this at a mirror if builds run offline.
ARG NVIDIA_PIP_INDEX=https://pypi.nvidia.com

# ---------------------------------------------------------------------------------------------
FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04 AS cuda-python
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Versions come from the pinned base image's Ubuntu release; pinning Debian revisions as well
# breaks the build whenever Ubuntu publishes a security update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# ---------------------------------------------------------------------------------------------
FROM cuda-python AS gpu-venv
ARG NVIDIA_PIP_INDEX
ARG TENSORRT_VERSION
ARG ONNXRUNTIME_GPU_VERSION
ARG CUDA_PYTHON_VERSION
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service/ service/
COPY engine_build/ engine_build/
# `serve` pulls the CPU onnxruntime, `gpu` onnxruntime-gpu; both install the same `onnxruntime`
# module, so the CPU wheel is removed and the GPU wheel reinstalled over it.
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --extra-index-url "${NVIDIA_PIP_INDEX}" ".[serve,trt,gpu,storage]" \
        "tensorrt==${TENSORRT_VERSION}" \
        "onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}" \
        "cuda-python==${CUDA_PYTHON_VERSION}" \
    && /opt/venv/bin/pip uninstall -y onnxruntime \
    && /opt/venv/bin/pip install --force-reinstall --no-deps "onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}" \
    && /opt/venv/bin/python -c "import pathlib, onnxruntime as o; [p.unlink() for p in (pathlib.Path(o.__file__).parent / 'capi').glob('libonnxruntime_providers_tensorrt*')]" \
    && /opt/venv/bin/python -c "import pathlib, onnxruntime as o; assert not list((pathlib.Path(o.__file__).parent / 'capi').glob('libonnxruntime_providers_tensorrt*')), 'ORT TensorRT provider still shipped'" \
    && /opt/venv/bin/python -c "import service, onnxruntime, tensorrt; print(onnxruntime.get_available_providers(), tensorrt.__version__)" \
    && if /opt/venv/bin/python -c "import torch" 2>/dev/null; then echo "torch must not be in the serving image" >&2; exit 1; fi

# ---------------------------------------------------------------------------------------------
FROM python:3.12.11-slim-bookworm AS cpu-venv
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service/ service/
COPY engine_build/ engine_build/
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install ".[serve,openvino,storage]" \
    && /opt/venv/bin/python -c "import service, onnxruntime" \
    && if /opt/venv/bin/python -c "import torch" 2>/dev/null; then echo "torch must not be in the serving image" >&2; exit 1; fi

# ---------------------------------------------------------------------------------------------
# The export toolchain. Heavy (torch with its CUDA libraries): used by the engine-build Job and
# `docker compose run build`, never for serving.
FROM cuda-python AS build
ARG NVIDIA_PIP_INDEX
ARG TENSORRT_VERSION
ARG CUDA_PYTHON_VERSION
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service/ service/
COPY engine_build/ engine_build/
ARG ONNXRUNTIME_GPU_VERSION
# onnxruntime-gpu replaces the CPU onnxruntime the build extra pulls (same module name), so int8/fp8
# calibration runs on the GPU in the engine-build Job (gendr-build quantize --calib-ep cuda:0; not
# `trt`: its TensorRT provider links TensorRT 10 and is deleted here as in the gpu image, see above).
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --extra-index-url "${NVIDIA_PIP_INDEX}" ".[build,trt]" \
        "tensorrt==${TENSORRT_VERSION}" \
        "cuda-python==${CUDA_PYTHON_VERSION}" \
    && /opt/venv/bin/pip uninstall -y onnxruntime \
    && /opt/venv/bin/pip install --force-reinstall --no-deps "onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}" \
    && /opt/venv/bin/python -c "import pathlib, onnxruntime as o; [p.unlink() for p in (pathlib.Path(o.__file__).parent / 'capi').glob('libonnxruntime_providers_tensorrt*')]" \
    && /opt/venv/bin/python -c "import onnxruntime as o; assert 'CUDAExecutionProvider' in o.get_available_providers()" \
    && groupadd --gid 10001 gendr \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin gendr \
    && mkdir -p /models && chown 10001:10001 /models
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    GENDR_MODEL_REPOSITORY=/models
# From /, gendr-build's relative default paths (models/<name>) land in the volume.
WORKDIR /
VOLUME ["/models"]
USER 10001:10001
ENTRYPOINT ["gendr-build"]
CMD ["--help"]

# ---------------------------------------------------------------------------------------------
FROM python:3.12.11-slim-bookworm AS cpu
# glibc malloc (here, in the gpu stage, compose and k8s): 2 arenas instead of 8 per core, and buffers
# of 1 MiB and more (decoded images) mmapped, so freeing them returns the memory; with the defaults
# RSS keeps ~100-160 MB of freed decode buffers after a few large images. docs/reliability.md.
LABEL org.opencontainers.image.title="gendr-serve (CPU)" \
      org.opencontainers.image.description="GenDR super-resolution inference service, ONNX Runtime CPU" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    GENDR_MODEL_REPOSITORY=/models \
    GENDR_BACKEND=auto \
    MALLOC_ARENA_MAX=2 \
    MALLOC_MMAP_THRESHOLD_=1048576
COPY --from=cpu-venv /opt/venv /opt/venv
RUN groupadd --gid 10001 gendr \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin gendr \
    && mkdir -p /models && chown 10001:10001 /models
VOLUME ["/models"]
USER 10001:10001
EXPOSE 8000
# Liveness only: readiness (/readyz) belongs to the orchestrator, which also knows about draining.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
ENTRYPOINT ["gendr-serve"]
CMD ["--host", "0.0.0.0", "--port", "8000"]

# ---------------------------------------------------------------------------------------------
# Last stage = default target.
FROM cuda-python AS gpu
LABEL org.opencontainers.image.title="gendr-serve" \
      org.opencontainers.image.description="GenDR super-resolution inference service, TensorRT / ONNX Runtime CUDA" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    GENDR_MODEL_REPOSITORY=/models \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    MALLOC_ARENA_MAX=2 \
    MALLOC_MMAP_THRESHOLD_=1048576
COPY --from=gpu-venv /opt/venv /opt/venv
RUN groupadd --gid 10001 gendr \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin gendr \
    && mkdir -p /models && chown 10001:10001 /models
VOLUME ["/models"]
USER 10001:10001
EXPOSE 8000
# Generous start period: TensorRT engines deserialise and warm up before the server answers.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
ENTRYPOINT ["gendr-serve"]
CMD ["--host", "0.0.0.0", "--port", "8000"]
