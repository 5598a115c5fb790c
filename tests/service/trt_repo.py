"""Model repositories for TensorRT-backend tests on the test double (tests/service/trt_double.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from cuda_double import FakeGpu
from trt_double import H100, EngineSpec


def write_engine_repo(
    root: Path,
    spec: EngineSpec,
    *,
    name: str = "fake-trt",
    precision: str = "fp16",
    batch_sizes: list[int] | None = None,
    gpu: FakeGpu = H100,
    mode: str = "shared",
    overlap: int = 4,
) -> Path:
    """A model repository with one fake-plan engine for `gpu` (a single-network model, no ONNX)."""
    from service.manifest import Engine, EngineProfile, Manifest, TileGeometry, make_artifact, write_manifest

    model_dir = root / name
    cc = "{}.{}".format(*gpu.compute_capability)
    plan = model_dir / "engines" / f"sm{cc.replace('.', '')}" / precision / "engine-fake.plan"
    plan.parent.mkdir(parents=True, exist_ok=True)
    plan.write_bytes(spec.plan())
    sizes = batch_sizes or sorted({b for p in spec.profiles for b in p})
    engine = Engine(
        plan=make_artifact(model_dir, plan),
        precision=precision,  # type: ignore[arg-type]
        onnx_sha256="0" * 64,
        tensorrt_version=spec.tensorrt_version,
        compute_capability=cc,
        gpu_name=gpu.name,
        profile=EngineProfile(
            batch_sizes=sizes,
            tile=spec.tile,
            mode=mode,  # type: ignore[arg-type]
            count=len(spec.profiles),
            opt_batch=spec.profiles[0][1] if mode == "shared" else None,
        ),
        key="fake-" + precision,
    )
    manifest = Manifest(
        name=name,
        kind="single",
        native_scale=spec.scale,
        tile=TileGeometry(tile=spec.tile, overlap=overlap, graph_scale=spec.scale, size_multiple=8),
        engines=[engine],
    )
    write_manifest(model_dir, manifest)
    return model_dir


def nearest_up(batch: np.ndarray, s: int) -> np.ndarray:
    """What the fake engine computes: nearest-neighbour ×s of NHWC uint8 tiles."""
    return batch.repeat(s, axis=1).repeat(s, axis=2)
