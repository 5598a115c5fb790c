"""ONNX Runtime backend: CPU (the embedded default), CUDA EP and TensorRT EP (onnxruntime-gpu).

The exported graph takes uint8 [B, t, t, 3] and returns uint8 [B, t·s, t·s, 3] with a dynamic batch
axis, so every batch size 1..max_batch runs without padding. A repository with shape buckets has one
graph per tile (and maybe a dynamic-shape one for whole images): each gets its own session(s), so
every bucket costs one more copy of the weights in memory (small for SR CNNs; GenDR's buckets are
few). The TensorRT EP serves the primary tile only (its engines are built per static shape).

Sessions per instance:
- CPU: instances share one InferenceSession (ORT's Run is thread-safe; the weights exist once — 3.7 GB
  for full-size GenDR in fp32) unless each instance needs its own intra-op pool: with
  cores/instances > 1 threads per instance, concurrent Run() calls on one session would share one
  pool, so each instance then gets its own session. With one thread per instance (instances ≥ cores)
  a Run computes in its calling thread and both layouts measured the same (docs/benchmarks.md).
- CUDA EP: one shared session; concurrent Run() calls are allowed and overlap on the GPU.
- TensorRT EP: one session per instance. The EP serialises Run() calls on one session (one engine,
  one execution context behind a lock), so a shared session would make extra instances useless.
  Its engine and timing caches go to `cache_dir` (GENDR_ORT_TRT_CACHE_DIR), never beside the model:
  the model repository is a read-only mount in Kubernetes.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np

from service.backends.base import (
    BackendInfo,
    BackendUnavailable,
    IntegrityError,
    Timings,
    available_cpus,
    dynamic_sample_shapes,
    timed_warmup,
    verify,
)
from service.backends.memory import DeviceMemory, HostMemory, MemoryFit, MemoryProbe, measure
from service.manifest import Manifest, OnnxVariant
from service.settings import Settings

log = logging.getLogger(__name__)

Provider = Literal["cpu", "cuda", "trt"]

_PROVIDER = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "trt": "TensorrtExecutionProvider",
}
# Precision preference when `auto`: on CPU int8 first — but only a graph whose recorded parity passes
# (int8_passes) — then fp32 (MLAS has no fast fp16 path); fp16 on GPUs.
_AUTO_ORDER: dict[Provider, tuple[str, ...]] = {
    "cpu": ("int8", "fp32", "fp16", "bf16"),
    "cuda": ("fp16", "fp32", "bf16", "int8"),
    "trt": ("fp16", "int8", "fp32", "fp8", "bf16"),
}
#: The quality bound an int8 graph must meet for `auto` on CPU: PSNR against the fp32 graph's output on
#: real-photo tiles, measured by `gendr-build quantize` and recorded in the manifest (quantization.parity).
INT8_MIN_PSNR_DB = 40.0


def int8_passes(variant: OnnxVariant) -> tuple[bool, str]:
    """Whether `auto` may serve this int8 graph on CPU, and why: its recorded parity figure passes the bound
    and it was quantized from the fp32 graph (an fp16-based one runs its float part in fp16, slow on CPU)."""
    q = variant.quantization or {}
    parity = q.get("parity")
    if not isinstance(parity, dict) or not isinstance(parity.get("psnr_db"), int | float):
        return False, "int8 graph has no recorded parity figure (re-run gendr-build quantize)"
    psnr = float(parity["psnr_db"])
    if psnr < INT8_MIN_PSNR_DB:
        return False, f"int8 parity {psnr:.1f} dB vs fp32 is below the {INT8_MIN_PSNR_DB:.0f} dB bound"
    if q.get("base") not in (None, "fp32"):
        return False, f"int8 graph was quantized from the {q.get('base')} graph, not fp32"
    return True, f"int8 parity {psnr:.1f} dB vs fp32 ≥ {INT8_MIN_PSNR_DB:.0f} dB"


def pick_variant(manifest: Manifest, provider: Provider, precision: str) -> OnnxVariant:
    if not manifest.onnx:
        raise BackendUnavailable(f"{manifest.name}: the manifest lists no ONNX graph")
    if precision != "auto":
        if precision not in manifest.onnx:
            raise BackendUnavailable(
                f"{manifest.name}: no {precision} ONNX graph (available: {', '.join(sorted(manifest.onnx))})"
            )
        return manifest.onnx[precision]
    for p in _AUTO_ORDER[provider]:
        if p not in manifest.onnx:
            continue
        if provider == "cpu" and p == "int8":
            ok, why = int8_passes(manifest.onnx[p])
            log.info("%s: auto precision on CPU: %s", manifest.name, why)
            if not ok:
                continue
        return manifest.onnx[p]
    return next(iter(manifest.onnx.values()))


class OnnxRuntimeBackend:
    def __init__(
        self,
        manifest: Manifest,
        model_dir: Path | str,
        *,
        provider: Provider = "cpu",
        precision: str = "auto",
        instances: int = 1,
        intra_op_threads: int = 0,
        max_batch: int = 4,
        device_id: int = 0,
        session_per_instance: bool | None = None,
        cache_dir: Path | None = None,
        max_call_pixels: int = 65_536,
    ) -> None:
        if provider not in _PROVIDER:
            raise ValueError(f"unknown provider {provider!r}")
        self.manifest = manifest
        self.model_dir = Path(model_dir)
        self.provider: Provider = provider
        self.variant = pick_variant(manifest, provider, precision)
        self.instances = instances
        self.threads = intra_op_threads or max(1, available_cpus() // instances)
        self.max_batch = max_batch
        self.device_id = device_id
        if session_per_instance is None:
            session_per_instance = instances > 1 and (
                provider == "trt" or (provider == "cpu" and self.threads > 1)
            )
        self.session_per_instance = session_per_instance
        self.cache_dir = cache_dir or Path(tempfile.gettempdir()) / "gendr-ort-trt-cache" / manifest.name
        # graph per shape: tile edge → (graph, external data); None = the dynamic-shape graph
        p = self.variant.precision
        served = provider != "trt"  # the TensorRT EP builds engines per static shape: primary tile only
        self._graphs = manifest.shape_files(p, buckets=served, dynamic=served and max_call_pixels > 0)
        self.tiles = tuple(sorted(t for t in self._graphs if t is not None))
        self.dynamic = None in self._graphs
        self.max_call_pixels = max_call_pixels
        self._precision = p
        self._sessions: dict[int | None, list[object]] = {}
        self._healthy = False
        self.whole_image_memory: MemoryFit | None = None  # measured at warm-up (the whole-image cap)

    @classmethod
    def from_settings(
        cls, name: str, manifest: Manifest, model_dir: Path, settings: Settings
    ) -> OnnxRuntimeBackend:
        provider: Any = {"onnxruntime-cpu": "cpu", "onnxruntime-cuda": "cuda", "onnxruntime-trt": "trt"}[name]
        cache = settings.ort_trt_cache_dir
        return cls(
            manifest,
            model_dir,
            provider=provider,
            precision=settings.precision,
            instances=settings.instances(),
            intra_op_threads=settings.intra_op_threads,
            max_batch=settings.max_batch,
            device_id=settings.device_id,
            cache_dir=cache / manifest.name if cache else None,
            max_call_pixels=settings.whole_image_max_pixels,
        )

    @property
    def info(self) -> BackendInfo:
        name = {"cpu": "onnxruntime-cpu", "cuda": "onnxruntime-cuda", "trt": "onnxruntime-trt"}[self.provider]
        device = "cpu" if self.provider == "cpu" else f"cuda:{self.device_id}"
        return BackendInfo(
            name=name,
            device=device,
            precision=self.variant.precision,
            engine_key=self.variant.graph.sha256[:16],
            batch_sizes=tuple(range(1, self.max_batch + 1)),
            instances=self.instances,
            tiles=self.tiles,
            dynamic=self.dynamic,
            extra={
                "intra_op_threads": str(self.threads) if self.provider == "cpu" else "",
                "sessions": str((self.instances if self.session_per_instance else 1) * len(self._graphs)),
                "onnx_key": self.variant.key[:16],
            },
        )

    def _providers(self) -> list[object]:
        if self.provider == "cpu":
            return ["CPUExecutionProvider"]
        cuda = ("CUDAExecutionProvider", {"device_id": self.device_id, "cudnn_conv_algo_search": "HEURISTIC"})
        if self.provider == "cuda":
            return [cuda, "CPUExecutionProvider"]
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        name, t = self.variant.input_name, self.manifest.tile.tile
        trt = {
            "device_id": self.device_id,
            "trt_fp16_enable": self.variant.precision == "fp16",
            "trt_int8_enable": self.variant.precision == "int8",
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(self.cache_dir),
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(self.cache_dir),
            "trt_profile_min_shapes": f"{name}:1x{t}x{t}x3",
            "trt_profile_max_shapes": f"{name}:{self.max_batch}x{t}x{t}x3",
            "trt_profile_opt_shapes": f"{name}:{self.max_batch}x{t}x{t}x3",
        }
        return [("TensorrtExecutionProvider", trt), cuda, "CPUExecutionProvider"]

    def load(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:  # pragma: no cover - a dependency of the serve extra
            raise BackendUnavailable("onnxruntime is not installed (pip install 'gendr-serve[serve]')") from e
        wanted = _PROVIDER[self.provider]
        if wanted not in ort.get_available_providers():
            raise BackendUnavailable(
                f"ONNX Runtime {ort.__version__} has no {wanted} "
                f"(available: {', '.join(ort.get_available_providers())}); "
                "install onnxruntime-gpu for CUDA/TensorRT"
            )
        n_sessions = self.instances if self.session_per_instance else 1
        sessions: dict[int | None, list[object]] = {}
        for tile, (art, data) in self._graphs.items():
            graph = verify(self.model_dir, art, self.manifest.name)
            if data:
                verify(self.model_dir, data, self.manifest.name)
            sessions[tile] = [self._session(ort, graph) for _ in range(n_sessions)]
            self._check_io(sessions[tile][0], tile, art.path)
        self._sessions = sessions
        self._healthy = True
        log.info(
            "%s: loaded %s (%s) for tiles %s%s with %d session(s) each for %d instance(s)",
            self.manifest.name,
            self.variant.graph.path,
            self.info.name,
            self.tiles,
            " + whole images" if self.dynamic else "",
            n_sessions,
            self.instances,
        )

    def _session(self, ort: Any, graph: Path) -> object:
        wanted = _PROVIDER[self.provider]
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.inter_op_num_threads = 1
        if self.provider == "cpu":
            so.intra_op_num_threads = self.threads
            # No spinning: idle pool threads that spin steal the cores that decode, encode and
            # stitch on (and sibling sessions' pools); measured in the peer benchmark.
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        s = ort.InferenceSession(str(graph), so, providers=self._providers())
        if wanted not in s.get_providers():  # ORT drops a provider whose libraries fail to load, silently
            raise BackendUnavailable(
                f"{wanted} could not be initialised (session uses {s.get_providers()}; ONNX Runtime's "
                "log above says why, e.g. a CUDA or cuDNN library it could not load)"
            )
        return s

    def _check_io(self, session: object, tile: int | None, path: str) -> None:
        """The graph's I/O against the manifest (IntegrityError: another graph than the one exported)."""

        def mismatch(detail: str) -> IntegrityError:
            return IntegrityError(self.manifest.name, path, "io", detail)

        g = self.manifest.tile.graph_scale
        t = tile if tile is not None else -1  # -1: a dynamic axis is expected
        ot = t * g if tile is not None else -1
        ins = {i.name: i for i in session.get_inputs()}  # type: ignore[attr-defined]
        outs = {o.name: o for o in session.get_outputs()}  # type: ignore[attr-defined]
        iname, oname = self.variant.input_name, self.variant.output_name
        if iname not in ins or oname not in outs:
            raise mismatch(
                f"graph has inputs {list(ins)} and outputs {list(outs)}, manifest says {iname} → {oname}"
            )
        if ins[iname].type != "tensor(uint8)" or outs[oname].type != "tensor(uint8)":
            raise mismatch("graph must map uint8 tiles to uint8 tiles")
        shape = ins[iname].shape
        if len(shape) != 4 or any(
            isinstance(d, int) and e != -1 and d != e for d, e in zip(shape[1:], (t, t, 3), strict=True)
        ):
            raise mismatch(f"graph input shape {shape} does not match tile {t}×{t}×3")
        if tile is None and len(shape) == 4 and isinstance(shape[1], int):
            raise mismatch(f"the dynamic-shape graph has a static input {shape}")
        b = shape[0]
        if isinstance(b, int) and b > 0 and b < self.max_batch:
            raise BackendUnavailable(
                f"{self.manifest.name}: graph has a fixed batch of {b}; max_batch is {self.max_batch}"
            )
        oshape = outs[oname].shape
        if len(oshape) == 4 and isinstance(oshape[1], int) and ot != -1 and oshape[1] != ot:
            raise mismatch(f"graph output tile {oshape[1]} but manifest implies {ot}")

    def warmup(self) -> Timings:
        dyn = dynamic_sample_shapes(self.manifest, self.max_call_pixels) if self.dynamic else ()
        if len(dyn) > 1:  # before the timed runs: the first call of a size shows what it allocates
            try:
                probe = self._memory_probe()
            except Exception as e:  # no NVML: the cap falls back to its default
                log.warning("%s: no memory reader for %s: %s", self.manifest.name, self.info.device, e)
            else:
                # ONNX Runtime's memory arena keeps what a call grew it by (and grows in powers of two:
                # memory the process really holds), so a size's need is the growth summed up to it
                self.whole_image_memory = measure(probe, self._run_grey, dyn, cumulative=True)
        return timed_warmup(self, self.instances, self.info.batch_sizes, self.tiles, dyn)

    def _memory_probe(self) -> MemoryProbe:
        return HostMemory() if self.provider == "cpu" else DeviceMemory(self.device_id)

    def _run_grey(self, h: int, w: int) -> object:
        return self.infer(0, np.full((1, h, w, 3), 128, dtype=np.uint8))

    def infer(self, instance: int, batch: np.ndarray) -> np.ndarray:
        h, w = batch.shape[1:3]
        key: int | None = h if h == w and h in self._sessions else None
        if key is None and not self.dynamic:
            raise ValueError(f"no graph for {h}×{w} tiles (tiles {self.tiles})")
        s = self._sessions[key][instance if self.session_per_instance else 0]
        return s.run([self.variant.output_name], {self.variant.input_name: batch})[0]  # type: ignore[attr-defined]

    def input_buffer(self, instance: int, n: int, tile: int) -> np.ndarray | None:
        return None  # the batcher's own buffer will do: infer() takes any host array

    def healthy(self) -> bool:
        return self._healthy

    def close(self) -> None:
        self._sessions = {}
        self._healthy = False
