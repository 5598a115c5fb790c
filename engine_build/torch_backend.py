"""PyTorch backend: the reference implementation, on CPU or CUDA, fp32 / fp16 / bf16, optional torch.compile.

It lives on the build side (it needs torch and the model code); the service's backend registry names
it by import path, so `service/` never imports it. The network is the same `TileGraph` the export
stage traces (uint8 NHWC tile in, uint8 NHWC tile out), so this backend differs from the ONNX and
TensorRT ones only in the engine. It is also the one wrapper the build tools (verify, parity, the
reference CLI, the GPU check) run PyTorch through.

Precision `auto`: fp32 on CPU; on CUDA bf16 from sm_80 on (fp32's range: GenDR's VAE decoder
overflows fp16), else fp16 with the VAE decoder kept in fp32 when the export's activation scan said
so (`decoder_fp32` in the manifest's fp16 variant). A non-finite output fails its batch.

Instances share one module (one copy of the weights). On CUDA each instance has its own stream, so
transfers and kernels of different instances overlap; on CPU instances share torch's intra-op pool.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from service.backends.base import (
    BackendInfo,
    BackendUnavailable,
    Timings,
    dynamic_sample_shapes,
    timed_warmup,
    verify,
)
from service.manifest import Manifest, TileGeometry
from service.settings import Settings

log = logging.getLogger(__name__)

DTYPES = ("fp32", "fp16", "bf16")


def checkpoint_root(manifest: Manifest) -> str:
    """The folder (GenDR) or file (single network) that manifest.checkpoint describes."""
    if not manifest.checkpoint:
        raise BackendUnavailable(f"{manifest.name}: the manifest lists no checkpoint for the torch backend")
    paths = [PurePosixPath(a.path) for a in manifest.checkpoint]
    if manifest.kind == "single":
        st = [p for p in paths if p.suffix == ".safetensors"]
        if len(st) != 1:
            raise BackendUnavailable(
                f"{manifest.name}: expected one .safetensors checkpoint, got {[str(p) for p in st]}"
            )
        return str(st[0])
    tops = {p.parts[0] for p in paths}
    if len(tops) != 1 or any(len(p.parts) < 2 for p in paths):
        raise BackendUnavailable(
            f"{manifest.name}: checkpoint artifacts must sit in one folder, got {sorted(tops)}"
        )
    return tops.pop()


class TorchBackend:
    def __init__(
        self,
        manifest: Manifest,
        model_dir: Path | str = ".",
        *,
        precision: str = "auto",
        device: str | None = None,
        device_id: int = 0,
        instances: int = 1,
        max_batch: int = 4,
        compile: bool = False,
        intra_op_threads: int = 0,
        module: Any = None,
        decoder_fp32: bool | None = None,
        max_call_pixels: int = 0,
    ) -> None:
        self.manifest = manifest
        self.max_call_pixels = max_call_pixels  # > 0: whole images on a `single` CNN (eager only)
        self.model_dir = Path(model_dir)
        self.device_id = device_id
        self._device = device  # None → cuda if available else cpu, resolved at load()
        self.precision = precision
        self.instances = instances
        self.max_batch = max_batch
        self.compile = compile
        self.threads = intra_op_threads
        self._module = module  # an nn.Module mapping [-1,1] NCHW → [-1,1] NCHW (tests, GPU check)
        fp16 = manifest.onnx.get("fp16")
        self.decoder_fp32 = (
            bool(fp16.options.get("decoder_fp32")) if decoder_fp32 is None and fp16 else bool(decoder_fp32)
        )
        self._precision = "" if precision == "auto" else precision  # resolved at load() for auto
        self._graph: Any = None
        self._compiled: Any = None
        self._streams: list[Any] = []
        self._dev_name = ""
        self._healthy = False
        self._lock = (
            threading.Lock()
        )  # CPU: torch's pool is shared; serialise calls instead of oversubscribing

    @classmethod
    def from_module(
        cls,
        net: Any,
        geometry: TileGeometry | None = None,
        *,
        name: str = "module",
        kind: str = "single",
        **kw: Any,
    ) -> TorchBackend:
        """Serve an in-memory network (random-weight GenDR for the GPU check, tests) without a repository.

        Without a geometry the backend still runs any tile size (infer does not look at it); only
        warmup() needs the real tile.
        """
        from service.manifest import PipelineParams

        geometry = geometry or TileGeometry(tile=64, overlap=0, graph_scale=1)
        manifest = Manifest(
            name=name,
            kind=kind,
            native_scale=geometry.graph_scale if kind == "single" else 4,
            tile=geometry,  # type: ignore[arg-type]
            pipeline=PipelineParams() if kind == "gendr" else None,
        )
        return cls(manifest, ".", module=net, **kw)

    @classmethod
    def from_settings(
        cls, name: str, manifest: Manifest, model_dir: Path, settings: Settings
    ) -> TorchBackend:
        return cls(
            manifest,
            model_dir,
            precision=settings.precision,
            device_id=settings.device_id,
            instances=settings.instances(),
            max_batch=settings.max_batch,
            compile=settings.torch_compile,
            intra_op_threads=settings.intra_op_threads,
            max_call_pixels=settings.whole_image_max_pixels,
        )

    @property
    def info(self) -> BackendInfo:
        dev = self._dev_name or (self._device or "auto")
        key = ",".join(a.sha256 for a in self.manifest.checkpoint) or "in-memory module"
        return BackendInfo(
            name="torch",
            device=dev,
            precision=self._resolved_precision(),
            engine_key=hashlib.sha256(key.encode()).hexdigest()[:16],
            batch_sizes=tuple(range(1, self.max_batch + 1)),
            instances=self.instances,
            tiles=self.manifest.tiles("fp32"),
            dynamic=self.dynamic,
            extra={"compile": str(self.compile)},
        )

    @property
    def dynamic(self) -> bool:
        """Eager PyTorch runs a CNN on any size; compiled graphs are static (one compile per shape)."""
        return self.manifest.kind == "single" and not self.compile and self.max_call_pixels > 0

    def _resolved_precision(self) -> str:
        return self._precision or ("fp32" if self._device == "cpu" else "auto")

    @staticmethod
    def auto_precision(device: Any) -> str:
        import torch

        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"

    def _load_net(self) -> Any:
        if self._module is not None:
            return self._module
        root = checkpoint_root(self.manifest)
        for art in self.manifest.checkpoint:
            verify(self.model_dir, art, self.manifest.name)  # IntegrityError: the model is refused
        try:
            if self.manifest.kind == "gendr":
                from engine_build.gendr.checkpoint import load_checkpoint

                return load_checkpoint(self.model_dir / root)
            from engine_build.gendr.model import UnitRangeAdapter
            from engine_build.sr.models import load_sr_safetensors
            from engine_build.sr.support import SpandrelCall

            # the network called exactly as the export traced it (noise maps, trace fixes, clamp)
            return UnitRangeAdapter(SpandrelCall(load_sr_safetensors(self.model_dir / root)).eval())
        except ImportError as e:
            raise BackendUnavailable(
                f"torch backend needs the build extra (pip install 'gendr-serve[build]'): {e}"
            ) from e

    def load(self) -> None:
        try:
            import torch
        except ImportError as e:
            raise BackendUnavailable("torch is not installed (pip install 'gendr-serve[build]')") from e
        from engine_build.gendr.model import TileGraph

        if self._device is None:
            self._device = f"cuda:{self.device_id}" if torch.cuda.is_available() else "cpu"
        dev = torch.device(self._device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailable("torch backend: CUDA requested but torch sees no GPU")
        prec = self._precision = self._precision or self.auto_precision(dev)
        if prec not in DTYPES:
            raise BackendUnavailable(f"torch backend runs {', '.join(DTYPES)}, not {prec}")
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[prec]
        if dev.type == "cpu" and dtype == torch.float16:
            raise BackendUnavailable("torch backend: fp16 on CPU is not supported; use fp32 or bf16")
        if dev.type == "cpu":
            if self.threads:  # process-wide: only when configured (GENDR_INTRA_OP_THREADS)
                torch.set_num_threads(self.threads)
            self._dev_name = "cpu"
        else:
            p = torch.cuda.get_device_properties(dev)
            self._dev_name = f"{dev} ({p.name}, sm_{p.major}{p.minor})"
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True  # static tile shapes: the autotuned choice is reused
        net = self._load_net()
        self._graph = TileGraph(net, compute_dtype=dtype, check_finite=True).to(dev, dtype).eval()
        vae = getattr(net, "vae", None)
        if prec == "fp16" and self.decoder_fp32 and vae is not None:
            vae.decoder.float()  # GenDR.decode casts the latent to the decoder's dtype
            if vae.post_quant_conv is not None:
                vae.post_quant_conv.float()
        if self.compile:
            # one graph per batch size (static shapes), compiled during warmup on one thread
            for knob in ("recompile_limit", "cache_size_limit"):
                if hasattr(torch._dynamo.config, knob):
                    setattr(torch._dynamo.config, knob, max(64, 2 * self.max_batch))
            self._compiled = torch.compile(self._graph, dynamic=False)
        else:
            self._compiled = self._graph
        self._streams = [torch.cuda.Stream(dev) for _ in range(self.instances)] if dev.type == "cuda" else []
        self._healthy = True

    def warmup(self) -> Timings:
        dyn = dynamic_sample_shapes(self.manifest, self.max_call_pixels) if self.dynamic else ()
        return timed_warmup(self, self.instances, self.info.batch_sizes, self.manifest.tiles("fp32"), dyn)

    def infer(self, instance: int, batch: np.ndarray) -> np.ndarray:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(batch))
        with torch.inference_mode():
            if not self._streams:
                with self._lock:
                    return self._compiled(x).numpy()
            s = self._streams[instance]
            with torch.cuda.stream(s):
                xd = x.pin_memory().to(self._graph_device(), non_blocking=True)
                y = self._compiled(xd)
                out = torch.empty(y.shape, dtype=y.dtype, pin_memory=True)
                out.copy_(y, non_blocking=True)
            s.synchronize()
            return out.numpy()

    def _graph_device(self) -> Any:
        return next(self._graph.parameters()).device

    def input_buffer(self, instance: int, n: int, tile: int) -> np.ndarray | None:
        return None  # the batcher's own buffer will do: infer() takes any host array

    def healthy(self) -> bool:
        return self._healthy

    def close(self) -> None:
        self._graph = self._compiled = None
        self._streams = []
        self._healthy = False
