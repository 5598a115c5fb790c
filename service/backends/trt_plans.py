"""Which TensorRT plans a model serves on this GPU, and loading them: one plan per static tile.

The primary tile's plan is chosen from manifest.engines for this GPU's compute capability and this exact
TensorRT version (a plan deserialises only in the version that built it); it is required. Each shape
bucket (a smaller static tile, `Manifest.tiles`) has a plan of its own built with the same precision,
GPU generation and TensorRT version (`Manifest.engine_for`): a bucket whose plan is missing, damaged or
cannot run every batch size the primary serves is left out (logged) — its images then run on a larger
tile, slower but correct. Every plan is verified against its sha256 and its I/O and profiles checked: a
plan that is not the one the manifest lists (IntegrityError) refuses the model, bucket or not.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.backends.base import BackendUnavailable, IntegrityError, verify
from service.hardware import GpuInfo
from service.manifest import Engine, Manifest

if TYPE_CHECKING:  # typed by tensorrt-stubs in scripts/typecheck_trt.sh; imported for real at load
    import tensorrt

log = logging.getLogger(__name__)


@dataclass
class TilePlan:
    """One deserialised plan: the engine for input tiles of `tile` px and what it was checked to run."""

    tile: int
    entry: Engine
    engine: Any  # tensorrt.ICudaEngine
    in_name: str
    out_name: str
    batch_range: tuple[int, int]  # batch sizes every optimisation profile runs (min, max)


def choose_primary(
    manifest: Manifest, gpu: GpuInfo, precision: str, trt_version: str, given: Engine | None
) -> Engine:
    """The primary tile's engine entry for this GPU and TensorRT (`given`: checked, else the best)."""
    from service.backends.select import engines_for

    e = given
    if e is None:
        ok, _ = engines_for(manifest, gpu, precision, trt_version)
        if not ok:
            built = ", ".join(
                f"{x.precision}@{x.compute_capability} t{x.profile.tile} (TensorRT {x.tensorrt_version})"
                for x in manifest.engines
            )
            raise BackendUnavailable(
                f"{manifest.name}: no TensorRT engine for {gpu.sm} ({gpu.name}), TensorRT "
                f"{trt_version}, precision {precision}; built: {built or 'none'}. "
                f"Run `gendr-build engine --model models/{manifest.name}` on this GPU type"
            )
        e = ok[0]
    elif e.compute_capability != gpu.compute_capability:
        raise BackendUnavailable(f"engine built for {e.compute_capability}, GPU is {gpu.compute_capability}")
    elif e.tensorrt_version != trt_version:
        raise BackendUnavailable(
            f"engine built with TensorRT {e.tensorrt_version}, runtime is {trt_version}: a plan only "
            "loads in the exact version that built it; rebuild the engine"
        )
    elif e.profile.tile != manifest.tile.tile:
        raise BackendUnavailable(
            f"engine built for {e.profile.tile}-px tiles, the primary is {manifest.tile.tile}"
        )
    _refuse_per_batch(e)
    return e


def _refuse_per_batch(e: Engine) -> None:
    if e.profile.mode == "per-batch":
        raise BackendUnavailable(
            f"{e.plan.path}: per-batch profile engines are not served (a context is pinned to one "
            "profile but offered every batch size); rebuild with --profile-mode shared"
        )


def bucket_tiles(manifest: Manifest, primary: Engine) -> tuple[int, ...]:
    """Tiles other than the primary's to look for plans of: the precision's shape buckets, and any tile
    an engine of the same precision, GPU generation and TensorRT version was built for."""
    built = {
        e.profile.tile
        for e in manifest.engines
        if (e.precision, e.compute_capability, e.tensorrt_version)
        == (primary.precision, primary.compute_capability, primary.tensorrt_version)
    }
    return tuple(sorted((set(manifest.tiles(primary.precision)) | built) - {primary.profile.tile}))


def served_tiles_before_load(manifest: Manifest, primary: Engine | None) -> tuple[int, ...]:
    """What info.tiles says before load(): the tiles with a plan beside `primary`, else the primary tile."""
    if primary is None:
        return (manifest.tile.tile,)
    others = [
        t
        for t in bucket_tiles(manifest, primary)
        if manifest.engine_for(primary.precision, primary.compute_capability, primary.tensorrt_version, t)
    ]
    return tuple(sorted({primary.profile.tile, *others}))


def deserialize(runtime: Any, model_dir: Path, e: Engine, model: str) -> Any:
    """The verified plan deserialised (IntegrityError when it is not the plan the manifest lists,
    BackendUnavailable when this TensorRT refuses it)."""
    rt: tensorrt.Runtime = runtime
    plan = verify(model_dir, e.plan, model)
    engine = rt.deserialize_cuda_engine(plan.read_bytes())
    if engine is None:
        raise BackendUnavailable(f"{plan}: TensorRT could not deserialise the engine (see its log above)")
    return engine


def check_io(engine: Any, tile: int, model: str, path: str) -> tuple[str, str, tuple[int, int]]:
    """(input name, output name, batch range every profile runs) of a uint8 [B, tile, tile, 3] plan;
    IntegrityError when the plan's I/O is not what the manifest says."""
    import tensorrt as trt

    def mismatch(detail: str) -> IntegrityError:
        return IntegrityError(model, path, "io", detail)

    eng: tensorrt.ICudaEngine = engine
    names = [eng.get_tensor_name(i) for i in range(eng.num_io_tensors)]
    ins = [n for n in names if eng.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outs = [n for n in names if eng.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    if len(ins) != 1 or len(outs) != 1:
        raise mismatch(f"engine must have one input and one output tensor, has {ins} → {outs}")
    for n in (ins[0], outs[0]):
        if eng.get_tensor_dtype(n) != trt.DataType.UINT8:
            raise mismatch(f"engine tensor {n} is {eng.get_tensor_dtype(n)}, expected UINT8 tiles")
    lo, hi = 0, 1 << 30  # a context stays on its profile: every profile must run every served size
    for p in range(eng.num_optimization_profiles):
        mn, _, mx = eng.get_tensor_profile_shape(ins[0], p)
        if tuple(mn[1:]) != (tile, tile, 3) or tuple(mx[1:]) != (tile, tile, 3):
            raise mismatch(
                f"engine profile {p} has tile shape {tuple(mn[:])}..{tuple(mx[:])}, manifest says {tile}"
            )
        lo, hi = max(lo, int(mn[0])), min(hi, int(mx[0]))
    return ins[0], outs[0], (lo, hi)


def served_sizes(e: Engine, max_batch: int, batch_range: tuple[int, int]) -> tuple[int, ...]:
    """The entry's batch sizes up to max_batch (its smallest when none is) that every profile runs."""
    built = sorted(e.profile.batch_sizes)
    wanted = [b for b in built if b <= max_batch] or built[:1]
    lo, hi = batch_range
    sizes = tuple(b for b in wanted if lo <= b <= hi)
    if not sizes:
        raise BackendUnavailable(
            f"engine profiles run batch {lo}..{hi} in common; none of {wanted} (max_batch {max_batch}) fits"
        )
    return sizes


def load_plans(
    runtime: Any, manifest: Manifest, model_dir: Path, primary: Engine, max_batch: int
) -> tuple[dict[int, TilePlan], tuple[int, ...]]:
    """({tile: plan}, batch sizes served): the primary plan (errors raise) and every bucket plan that
    runs those sizes (the others are logged and left out)."""
    engine = deserialize(runtime, model_dir, primary, manifest.name)
    in_name, out_name, rng = check_io(engine, primary.profile.tile, manifest.name, primary.plan.path)
    sizes = served_sizes(primary, max_batch, rng)
    plans = {primary.profile.tile: TilePlan(primary.profile.tile, primary, engine, in_name, out_name, rng)}
    key = (primary.precision, primary.compute_capability, primary.tensorrt_version)
    for t in bucket_tiles(manifest, primary):
        e = manifest.engine_for(*key, tile=t)
        try:
            if e is None:
                raise BackendUnavailable(f"no {key[0]} plan for {t}-px tiles (gendr-build engine makes it)")
            _refuse_per_batch(e)
            missing = [b for b in sizes if b not in e.profile.batch_sizes]
            if missing:
                raise BackendUnavailable(f"{e.plan.path} was built without batch sizes {missing}")
            engine = deserialize(runtime, model_dir, e, manifest.name)  # IntegrityError refuses the model
            in_name, out_name, rng = check_io(engine, t, manifest.name, e.plan.path)
            if not rng[0] <= sizes[0] <= sizes[-1] <= rng[1]:
                raise BackendUnavailable(f"{e.plan.path} profiles run batch {rng[0]}..{rng[1]}, not {sizes}")
        except BackendUnavailable as err:
            log.warning(
                "%s: shape bucket %d px left out (its images run on a larger tile): %s", manifest.name, t, err
            )
            continue
        plans[t] = TilePlan(t, e, engine, in_name, out_name, rng)
    return dict(sorted(plans.items())), sizes
