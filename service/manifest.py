"""Model repository manifest: a versioned, validated description of one servable model.

Layout of `models/<name>/`:

    manifest.json                  this schema
    onnx/<precision>/model.onnx    (+ model.onnx.data when the graph is over 2 GB)
    engines/sm<cc>/<precision>/*.plan
    checkpoint/ …                  what the export read (optional; torch backend)

Every file the service reads is listed with its sha256; readers refuse a mismatch.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path, PurePosixPath
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MANIFEST_FILE = "manifest.json"
SCHEMA_VERSION = 1

ModelKind = Literal["gendr", "single"]
Precision = Literal["fp32", "fp16", "bf16", "int8", "fp8"]
ColorFix = Literal["none", "adain", "wavelet"]
COLOR_FIXES: tuple[str, ...] = get_args(ColorFix)  # the one list of colour-fix names
PRECISIONS: tuple[str, ...] = get_args(Precision)  # the one list of precisions
MODEL_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"  # model folder names (URLs, metric labels, paths)


class ManifestError(ValueError):
    """A model repository entry that is missing, malformed or does not match its hashes."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PipelineParams(_Strict):
    """GenDR's one-step pipeline constants; checkpoint metadata, never hard-coded in code paths."""

    timestep: int = Field(500, ge=0, le=999, description="Start timestep t_s fed to the UNet.")
    alpha: float = Field(0.5, gt=0, description="ᾱ in z_g = (z_l − β·ε)/ᾱ.")
    beta: float = Field(0.5, ge=0, description="β̄ in z_g = (z_l − β·ε)/ᾱ.")
    scaling_factor: float = Field(0.2614, gt=0, description="VAE latent scaling factor.")
    native_scale: int = Field(4, ge=1, le=8, description="Scale the model was trained for.")
    color_fix: ColorFix = Field("adain", description="Default colour correction against the bicubic input.")


class TileGeometry(_Strict):
    """Fixed tile shape of the exported graph. `tile` and `overlap` are in graph-input pixels."""

    tile: int = Field(..., ge=8, le=4096, description="Square input tile edge.")
    overlap: int = Field(..., ge=0, description="Overlap between neighbouring input tiles.")
    graph_scale: int = Field(..., ge=1, le=8, description="Output tile edge = tile × graph_scale.")
    size_multiple: int = Field(8, ge=1, description="The network accepts multiples of this.")
    context: int | None = Field(
        None,
        ge=0,
        description="Measured input context (px) an output pixel needs to be exact to ±1 level; "
        "None: not measured, or more than was measured (global pooling / attention).",
    )
    needed_overlap: int | None = Field(
        None, ge=0, description="Overlap at which tiles stitch exactly (4 × context); informational."
    )

    @model_validator(mode="after")
    def _check(self) -> TileGeometry:
        if self.overlap * 2 >= self.tile:
            raise ValueError(f"overlap {self.overlap} must be less than half the tile {self.tile}")
        if self.tile % self.size_multiple:
            raise ValueError(f"tile {self.tile} must be a multiple of {self.size_multiple}")
        return self

    @property
    def out_tile(self) -> int:
        return self.tile * self.graph_scale


def _check_rel_path(v: str) -> str:
    p = PurePosixPath(v)
    if p.is_absolute() or ".." in p.parts or not v:
        raise ValueError(f"artifact path must be relative inside the model folder: {v!r}")
    return v


class Artifact(_Strict):
    path: str
    sha256: str = Field(..., pattern=r"^[0-9a-f]{64}$")
    size: int = Field(..., ge=0)

    _path = field_validator("path")(classmethod(lambda cls, v: _check_rel_path(v)))


class ShapeGraph(_Strict):
    """The same network at the same precision for another input shape (a shape bucket).

    Engine calls stay static-shape: a small image runs on the smallest tile that holds it instead of
    being padded up to the primary tile; a dynamic graph runs a whole image in one call (CNNs, whose
    cost is about linear in pixels; never GenDR, whose traced UNet freezes its sizes).
    """

    tile: int | None = Field(
        ..., ge=8, le=4096, description="Static square input tile edge; None: dynamic height and width."
    )
    graph: Artifact
    external_data: Artifact | None = None
    key: str = Field(..., description="Hash of every input of the step that produced it (idempotency).")
    options: dict[str, object] = Field(default_factory=dict, description="Parity, timings (informational).")


class OnnxVariant(_Strict):
    """One ONNX graph of the tile pipeline at one precision (+ the same network at other shapes)."""

    precision: Precision
    graph: Artifact
    external_data: Artifact | None = None
    input_name: str = "lr_tile"
    output_name: str = "sr_tile"
    opset: int
    key: str = Field(..., description="Hash of every input of the step that produced it (idempotency).")
    quantization: dict[str, object] | None = Field(
        None, description="Calibration and exclusions for int8/fp8."
    )
    options: dict[str, object] = Field(
        default_factory=dict,
        description="How the step ran: fp16 islands, activation scan, timings (informational).",
    )
    shapes: list[ShapeGraph] = Field(
        default_factory=list, description="Shape buckets: the same network at other tile sizes / dynamic."
    )
    cpu_only: str | None = Field(
        None,
        description="Why only ONNX Runtime serves this graph (it breaks a TensorRT rule, e.g. the asymmetric "
        "int8 of ONNX Runtime's quantizer); `gendr-build engine` refuses it. None: no such limit.",
    )

    @model_validator(mode="after")
    def _check_shapes(self) -> OnnxVariant:
        seen = [s.tile for s in self.shapes]
        if len(set(seen)) != len(seen):
            raise ValueError(f"{self.precision}: a shape appears twice in {seen}")
        return self


class EngineProfile(_Strict):
    batch_sizes: list[int] = Field(..., min_length=1)
    tile: int
    mode: Literal["shared", "per-batch"] = Field(
        "shared",
        description="shared: `count` identical profiles [min..max batch] (one per execution context); "
        "per-batch: profile i is static at batch_sizes[i].",
    )
    count: int = Field(1, ge=1, description="Number of optimisation profiles in the plan.")
    opt_batch: int | None = Field(None, description="Batch size the shared profiles are tuned for.")


class Engine(_Strict):
    """A TensorRT plan and everything it was built from; valid only on `compute_capability`."""

    plan: Artifact
    precision: Precision
    onnx_sha256: str
    tensorrt_version: str
    compute_capability: str = Field(..., pattern=r"^\d+\.\d+$")
    gpu_name: str
    gpu_memory: int = Field(0, ge=0, description="Total memory of the GPU that built it (bytes; 0: unknown).")
    profile: EngineProfile
    key: str
    build: dict[str, object] = Field(
        default_factory=dict, description="Build options and timings (informational)."
    )


class Source(_Strict):
    checkpoint_sha256: str | None = None
    description: str = ""
    license: str | None = None
    attribution: str | None = None


class Manifest(_Strict):
    schema_version: Literal[1] = SCHEMA_VERSION
    name: str = Field(..., pattern=MODEL_NAME_PATTERN)
    kind: ModelKind
    native_scale: int = Field(..., ge=1, le=8)
    tile: TileGeometry
    pipeline: PipelineParams | None = None
    prompt_embeds: Artifact | None = Field(
        None, description="Fixed embeddings (safetensors); baked into graphs."
    )
    checkpoint: list[Artifact] = Field(
        default_factory=list, description="Weights the torch backend can load."
    )
    onnx: dict[str, OnnxVariant] = Field(default_factory=dict)
    engines: list[Engine] = Field(default_factory=list)
    source: Source = Field(default_factory=Source)
    created_by: str = ""

    @model_validator(mode="after")
    def _check(self) -> Manifest:
        if self.kind == "gendr" and self.pipeline is None:
            raise ValueError("a gendr model needs pipeline parameters")
        if self.kind == "single" and self.tile.graph_scale != self.native_scale:
            raise ValueError("a single-network model's graph scale is its native scale")
        for k, v in self.onnx.items():
            if k != v.precision:
                raise ValueError(f"onnx[{k!r}] holds a {v.precision} graph")
            for sg in v.shapes:
                if sg.tile is None:
                    continue
                if sg.tile == self.tile.tile:
                    raise ValueError(f"onnx[{k!r}]: shape {sg.tile} is the primary tile")
                if sg.tile % self.tile.size_multiple:
                    m = self.tile.size_multiple
                    raise ValueError(f"onnx[{k!r}]: shape {sg.tile} is not a multiple of {m}")
        if self.kind == "gendr" and any(sg.tile is None for v in self.onnx.values() for sg in v.shapes):
            raise ValueError("a gendr model cannot have a dynamic-shape graph (its traced UNet is static)")
        return self

    def tiles(self, precision: str) -> tuple[int, ...]:
        """Static input tile edges the `precision` graphs cover (the primary tile and every bucket)."""
        v = self.onnx.get(precision)
        extra = [s.tile for s in v.shapes if s.tile is not None] if v is not None else []
        return tuple(sorted({self.tile.tile, *extra}))

    def shape_graph(self, precision: str, tile: int | None) -> ShapeGraph | None:
        """The bucket graph for `tile` (None: the dynamic one); the primary tile is `onnx[p].graph`."""
        v = self.onnx.get(precision)
        if v is None:
            return None
        return next((s for s in v.shapes if s.tile == tile), None)

    def shape_files(
        self, precision: str, *, buckets: bool = True, dynamic: bool = True
    ) -> dict[int | None, tuple[Artifact, Artifact | None]]:
        """(graph, external data) per served shape of `precision`: the primary tile, then each static
        bucket and (key None) the dynamic graph, as asked; what a backend opens one session per."""
        v = self.onnx[precision]
        out: dict[int | None, tuple[Artifact, Artifact | None]] = {self.tile.tile: (v.graph, v.external_data)}
        for sg in v.shapes:
            if (sg.tile is not None and buckets) or (sg.tile is None and dynamic):
                out[sg.tile] = (sg.graph, sg.external_data)
        return out

    def engine_for(
        self, precision: str, compute_capability: str, tensorrt_version: str, tile: int | None = None
    ) -> Engine | None:
        """The TensorRT plan built for this GPU generation, TensorRT version and tile (default: primary)."""
        want = self.tile.tile if tile is None else tile
        for e in self.engines:
            if (
                e.precision == precision
                and e.compute_capability == compute_capability
                and e.tensorrt_version == tensorrt_version
                and e.profile.tile == want
            ):
                return e
        return None

    def artifacts(self) -> list[Artifact]:
        out: list[Artifact] = list(self.checkpoint)
        if self.prompt_embeds:
            out.append(self.prompt_embeds)
        for v in self.onnx.values():
            out.append(v.graph)
            if v.external_data:
                out.append(v.external_data)
            for sg in v.shapes:
                out.append(sg.graph)
                if sg.external_data:
                    out.append(sg.external_data)
        out.extend(e.plan for e in self.engines)
        return out


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def make_artifact(model_dir: Path, path: Path) -> Artifact:
    rel = path.resolve().relative_to(model_dir.resolve()).as_posix()
    return Artifact(path=rel, sha256=sha256_file(path), size=path.stat().st_size)


def artifact_path(model_dir: Path, art: Artifact) -> Path:
    """The artifact's real path, refused when it (or a folder on the way) is a link out of the model folder.

    A symlink to a file elsewhere with the same bytes would pass the hash check and have the service
    read a file that the repository's owner never put in the model folder; so links are resolved
    first and must stay inside it, and the resolved path is what gets opened (no link followed later).
    """
    root = Path(model_dir).resolve()
    p = Path(model_dir) / art.path
    real = p.resolve()
    if not real.is_relative_to(root):
        raise ManifestError(
            f"{Path(model_dir).name}: artifact {art.path} is a link to {real}, outside the model folder; "
            "copy the file into the folder instead"
        )
    return real


def _open_no_follow(path: Path) -> int:
    """Open a resolved artifact path, refusing a link swapped in after resolution (O_NOFOLLOW)."""
    try:
        return os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        raise ManifestError(f"cannot open artifact {path}: {e.strerror}") from e


def verify_artifact(model_dir: Path, art: Artifact) -> Path:
    """Real path of the artifact, checked: inside the model folder, and its size and sha256 match."""
    p = artifact_path(model_dir, art)
    if not p.is_file():
        raise ManifestError(f"{model_dir.name}: artifact {art.path} is missing")
    fd = _open_no_follow(p)
    with open(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size != art.size:
            raise ManifestError(f"{model_dir.name}: {art.path} has {size} bytes, manifest says {art.size}")
        h = hashlib.sha256()
        while block := f.read(1 << 20):
            h.update(block)
    digest = h.hexdigest()
    if digest != art.sha256:
        raise ManifestError(
            f"{model_dir.name}: {art.path} sha256 {digest[:12]}… does not match the manifest "
            f"({art.sha256[:12]}…); re-run the export step that wrote it"
        )
    return p


def read_manifest(model_dir: Path, verify: bool = True) -> Manifest:
    path = Path(model_dir) / MANIFEST_FILE
    if not path.is_file():
        raise ManifestError(f"{model_dir}: no {MANIFEST_FILE} (not a model repository entry)")
    try:
        manifest = Manifest.model_validate_json(path.read_bytes())
    except ValidationError as e:
        raise ManifestError(f"{path}: invalid manifest: {e}") from e
    if verify:
        for art in manifest.artifacts():
            verify_artifact(Path(model_dir), art)
    return manifest


def write_manifest(model_dir: Path, manifest: Manifest) -> Path:
    """Validate and write atomically (temp file + rename), so readers never see half a manifest."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    data = Manifest.model_validate(manifest.model_dump()).model_dump_json(indent=2)
    return atomic_write_bytes(model_dir / MANIFEST_FILE, data.encode())


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600; repositories are built by one user and served by another (containers)
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def list_models(repository: Path) -> list[str]:
    repository = Path(repository)
    if not repository.is_dir():
        return []
    return sorted(p.name for p in repository.iterdir() if (p / MANIFEST_FILE).is_file())


def hash_inputs(*parts: object) -> str:
    """Stable key over everything that affects a build step (files by hash, options as JSON)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()
