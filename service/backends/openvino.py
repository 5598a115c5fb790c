"""OpenVINO CPU backend (optional extra `openvino`): the repository's fp32 ONNX tile graph, run in bf16
on CPUs with bf16 matrix units (Intel AMX-BF16 / AVX512-BF16), else in fp32.

Why it exists (docs/benchmarks.md, "CPU efficiency"): on a Xeon with AMX, OpenVINO's bf16 kernels ran
the default Real-ESRGAN tile several times faster than ONNX Runtime's best CPU path, at PSNR > 50 dB
against the fp32 output — well inside the 40 dB bound that int8 must meet. ONNX Runtime's CPU provider
has no bf16 convolution, so this is a different runtime, not a different graph: the same fp32 ONNX file
(sha256-verified like every artifact) is read and compiled with OpenVINO's inference-precision hint.

It also serves the int8 graph that NNCF writes (`gendr-build quantize --tool nncf`, Q/DQ ONNX that
OpenVINO turns into int8 convolutions: VNNI / AMX-INT8 where the CPU has them, AVX2 otherwise). Its float
remainder (the first/last convolutions and the upsampling path) runs in fp32 on every CPU. VNNI/AMX sum
its int8 products exactly (the parity's `exact` row); a CPU without VNNI may saturate 8-bit weights, so
`auto` serves such a graph there only on a parity measured on such a CPU (select.int8_sums_hold), and
picks int8 only where select.py's rule says so (parity and speed).

Instances are OpenVINO infer requests on one compiled model (one copy of the weights); the compiled
model gets one stream per instance and the intra-op threads of all of them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from service.backends.base import (
    BackendInfo,
    BackendUnavailable,
    IntegrityError,
    Timings,
    available_cpus,
    timed_warmup,
    verify,
)
from service.hardware import CPU_UNIT_FLAGS, cpu_flags
from service.manifest import Artifact, Manifest, OnnxVariant
from service.settings import Settings

log = logging.getLogger(__name__)

NAME = "openvino-cpu"
#: /proc/cpuinfo flags that give OpenVINO a native bf16 matrix path (AMX tiles, AVX-512 BF16 dot products).
BF16_FLAGS = CPU_UNIT_FLAGS["bf16"]
#: ... and an int8 dot product into int32 (VNNI, AMX-INT8); without one, int8 runs on AVX2's saturating path.
INT8_FLAGS = CPU_UNIT_FLAGS["vnni"]
_HINT = {"bf16": "bf16", "fp32": "f32", "int8": "f32"}  # int8: its float remainder in fp32 (see above)
NNCF_TOOL = "nncf"  # quantization.tool of the int8 graphs this backend serves


def nncf_int8(manifest: Manifest) -> OnnxVariant | None:
    """The repository's int8 graph when NNCF made it (OpenVINO's form), else None: OpenVINO does not
    compile ONNX Runtime's or ModelOpt's int8 graphs into int8 kernels (docs/benchmarks.md)."""
    v = manifest.onnx.get("int8")
    return v if v is not None and (v.quantization or {}).get("tool") == NNCF_TOOL else None


def bf16_flags(flags: set[str] | None = None) -> list[str]:
    """The bf16 flags this CPU has (why `auto` prefers OpenVINO here), best first."""
    have = cpu_flags() if flags is None else flags
    return [f for f in BF16_FLAGS if f in have]


def int8_flags(flags: set[str] | None = None) -> list[str]:
    """The int8 dot-product flags this CPU has (VNNI, AMX-INT8), best first; none: AVX2's int8 path."""
    have = cpu_flags() if flags is None else flags
    return [f for f in INT8_FLAGS if f in have]


def resolve_precision(requested: str, flags: set[str] | None = None, nncf: bool = False) -> str:
    """`auto` → bf16 where the CPU has a bf16 matrix path, else fp32 (int8 only when select.py's rule asks
    for it by name); fp32/bf16 as asked; int8 when NNCF made the repository's int8 graph; others refused."""
    if requested == "auto":
        return "bf16" if bf16_flags(flags) else "fp32"
    if requested == "int8" and nncf:
        return "int8"
    if requested not in _HINT or requested == "int8":
        raise BackendUnavailable(
            f"{NAME} runs the fp32 ONNX graph in fp32 or bf16, or an int8 graph made by NNCF "
            f"(gendr-build quantize --tool nncf), not {requested} (other int8 graphs are served by "
            "onnxruntime-cpu)"
        )
    if requested == "bf16" and not bf16_flags(flags):
        raise BackendUnavailable(
            f"{NAME}: this CPU has none of {', '.join(BF16_FLAGS)}; bf16 would be emulated"
        )
    return requested


def fp32_variant(manifest: Manifest) -> OnnxVariant:
    if "fp32" not in manifest.onnx:
        raise BackendUnavailable(
            f"{manifest.name}: {NAME} needs the fp32 ONNX graph "
            f"(have: {', '.join(sorted(manifest.onnx)) or 'none'})"
        )
    return manifest.onnx["fp32"]


class OpenVinoBackend:
    def __init__(
        self,
        manifest: Manifest,
        model_dir: Path | str,
        *,
        precision: str = "auto",
        instances: int = 1,
        intra_op_threads: int = 0,
        max_batch: int = 4,
    ) -> None:
        self.manifest = manifest
        self.model_dir = Path(model_dir)
        self.precision = resolve_precision(precision, nncf=nncf_int8(manifest) is not None)
        self.variant = manifest.onnx["int8"] if self.precision == "int8" else fp32_variant(manifest)
        self.instances = instances
        self.threads = intra_op_threads or max(1, available_cpus() // instances)
        self.max_batch = max_batch
        # tile edge → (graph, external data): the primary tile and every static bucket
        # a dynamic graph would recompile per shape: left to ONNX Runtime
        self._graphs = {
            t: files
            for t, files in manifest.shape_files(self.variant.precision, dynamic=False).items()
            if t is not None
        }
        self.tiles = tuple(sorted(self._graphs))
        self._requests: dict[int, list[Any]] = {}
        self._healthy = False

    @classmethod
    def from_settings(
        cls, name: str, manifest: Manifest, model_dir: Path, settings: Settings
    ) -> OpenVinoBackend:
        return cls(
            manifest,
            model_dir,
            precision=settings.precision,
            instances=settings.instances(),
            intra_op_threads=settings.intra_op_threads,
            max_batch=settings.max_batch,
        )

    @property
    def info(self) -> BackendInfo:
        return BackendInfo(
            name=NAME,
            device="cpu",
            precision=self.precision,
            engine_key=self.variant.graph.sha256[:16],
            batch_sizes=tuple(range(1, self.max_batch + 1)),
            instances=self.instances,
            tiles=self.tiles,
            extra={
                "intra_op_threads": str(self.threads),
                "streams": str(self.instances),
                "inference_precision": _HINT[self.precision],
                "onnx_key": self.variant.key[:16],
            },
        )

    def load(self) -> None:
        try:
            import openvino as ov
        except ImportError as e:
            raise BackendUnavailable("openvino is not installed (pip install 'gendr-serve[openvino]')") from e
        core = ov.Core()
        requests = {}
        for tile, (art, data) in self._graphs.items():
            compiled = self._compile(ov, core, art, data, tile)
            requests[tile] = [compiled.create_infer_request() for _ in range(self.instances)]
        self._requests = requests
        self._healthy = True
        log.info(
            "%s: loaded tiles %s in OpenVINO %s (%s, %d stream(s), %d threads each)",
            self.manifest.name,
            self.tiles,
            ov.__version__,
            _HINT[self.precision],
            self.instances,
            self.threads,
        )

    def _compile(self, ov: Any, core: Any, art: Artifact, data: Artifact | None, t: int) -> Any:
        name = self.manifest.name
        graph = verify(self.model_dir, art, name)
        if data:
            verify(self.model_dir, data, name)
        ot = t * self.manifest.tile.graph_scale
        model = core.read_model(str(graph))
        if [p.get_any_name() for p in model.inputs] != [self.variant.input_name]:
            raise IntegrityError(name, art.path, "io", f"graph inputs are not [{self.variant.input_name}]")
        # A static batch when only batch 1 is served (OpenVINO's fastest case), else a bounded range.
        batch = ov.Dimension(1) if self.max_batch == 1 else ov.Dimension(1, self.max_batch)
        model.reshape({self.variant.input_name: ov.PartialShape([batch, t, t, 3])})
        config = {
            "INFERENCE_PRECISION_HINT": _HINT[self.precision],
            "INFERENCE_NUM_THREADS": self.threads * self.instances,
            "NUM_STREAMS": self.instances,
            "PERFORMANCE_HINT": "LATENCY" if self.instances == 1 else "THROUGHPUT",
        }
        try:
            compiled = core.compile_model(model, "CPU", config)
        except RuntimeError as e:
            raise BackendUnavailable(f"{NAME}: OpenVINO could not compile {graph.name}: {e}") from e
        out = compiled.outputs[0]
        if out.get_element_type() != ov.Type.u8 or compiled.inputs[0].get_element_type() != ov.Type.u8:
            raise IntegrityError(name, art.path, "io", "graph must map uint8 tiles to uint8 tiles")
        oshape = out.get_partial_shape()
        if oshape.rank.get_length() != 4 or oshape[1].get_length() != ot:
            raise IntegrityError(name, art.path, "io", f"graph output {oshape} but manifest implies {ot}")
        return compiled

    def warmup(self) -> Timings:
        return timed_warmup(self, self.instances, self.info.batch_sizes, self.tiles)

    def infer(self, instance: int, batch: np.ndarray) -> np.ndarray:
        h, w = batch.shape[1:3]
        if h != w or h not in self._requests:
            raise ValueError(f"no graph for {h}×{w} tiles (tiles {self.tiles})")
        req = self._requests[h][instance]
        req.infer({0: np.ascontiguousarray(batch)})
        return np.array(req.get_output_tensor(0).data, copy=True)  # the request reuses its buffer

    def input_buffer(self, instance: int, n: int, tile: int) -> np.ndarray | None:
        return None  # the batcher's own buffer will do: infer() takes any host array

    def healthy(self) -> bool:
        return self._healthy

    def close(self) -> None:
        self._requests = {}
        self._healthy = False
