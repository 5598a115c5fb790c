"""Model repositories for TensorRT-backend tests on the test double (tests/service/trt_double.py)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from cuda_double import FakeGpu
from trt_double import H100, EngineSpec

if TYPE_CHECKING:
    from service.manifest import Artifact, Engine


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
    buckets: Sequence[EngineSpec | int] = (),
) -> Path:
    """A model repository with one fake-plan engine for `gpu` (a single-network model, no ONNX).

    `buckets`: shape buckets of `precision` — an EngineSpec is a smaller tile with a plan of its own, an
    int a tile whose graph exists but whose plan was never built. With buckets the repository also
    lists placeholder ONNX graphs (never read by the TensorRT backend) so `Manifest.tiles` sees them."""
    from service.manifest import Manifest, OnnxVariant, ShapeGraph, TileGeometry, write_manifest

    model_dir = root / name
    sizes = batch_sizes or sorted({b for p in spec.profiles for b in p})
    engines = [
        _engine(model_dir, s, precision, sizes, gpu, mode) for s in (spec, *buckets) if not isinstance(s, int)
    ]
    onnx = {}
    if buckets:
        tiles = [b if isinstance(b, int) else b.tile for b in buckets]
        shapes = [ShapeGraph(tile=t, graph=_placeholder(model_dir, precision, t), key=f"t{t}") for t in tiles]
        graph = _placeholder(model_dir, precision, spec.tile)
        onnx = {precision: OnnxVariant(precision=precision, graph=graph, opset=18, key="x", shapes=shapes)}
    manifest = Manifest(
        name=name,
        kind="single",
        native_scale=spec.scale,
        tile=TileGeometry(tile=spec.tile, overlap=overlap, graph_scale=spec.scale, size_multiple=8),
        onnx=onnx,
        engines=engines,
    )
    write_manifest(model_dir, manifest)
    return model_dir


def _engine(
    model_dir: Path, spec: EngineSpec, precision: str, sizes: list[int], gpu: FakeGpu, mode: str
) -> Engine:
    from service.manifest import Engine, EngineProfile, make_artifact

    cc = "{}.{}".format(*gpu.compute_capability)
    plan = model_dir / "engines" / f"sm{cc.replace('.', '')}" / precision / f"engine-t{spec.tile}-fake.plan"
    plan.parent.mkdir(parents=True, exist_ok=True)
    plan.write_bytes(spec.plan())
    return Engine(
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
        key=f"fake-{precision}-t{spec.tile}",
    )


def _placeholder(model_dir: Path, precision: str, tile: int) -> Artifact:
    from service.manifest import make_artifact

    f = model_dir / "onnx" / precision / f"t{tile}" / "model.onnx"
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_bytes(b"placeholder graph")
    return make_artifact(model_dir, f)


def nearest_up(batch: np.ndarray, s: int) -> np.ndarray:
    """What the fake engine computes: nearest-neighbour ×s of NHWC uint8 tiles."""
    return batch.repeat(s, axis=1).repeat(s, axis=2)
