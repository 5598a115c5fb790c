"""The three-stage alternative to the fused tile graph, kept for measurement (docs/export.md).

    encoder.onnx   uint8 [B,t,t,3]        → z_l  float32 [B,16,t/8,t/8]   (normalise, VAE encode mean)
    unet.onnx      z_l                    → z_g  float32 [B,16,t/8,t/8]   (one UNet step, fixed embeddings)
    decoder.onnx   z_g                    → uint8 [B,t,t,3]               (VAE decode, clamp, round)

`measure_stages` exports the three graphs and runs them in ONNX Runtime next to the fused graph on
the same tiles, reporting export time, size, run time and the difference between the two paths.
The repository and the runtime use the fused graph only.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from engine_build.export.exporter import DEFAULT_OPSET
from engine_build.gendr.model import GenDR


class EncodeStage(nn.Module):
    def __init__(self, model: GenDR) -> None:
        super().__init__()
        self.model = model

    def forward(self, tile: torch.Tensor) -> torch.Tensor:
        x = tile.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return self.model.encode(x)


class UNetStage(nn.Module):
    def __init__(self, model: GenDR) -> None:
        super().__init__()
        self.model = model

    def forward(self, z_l: torch.Tensor) -> torch.Tensor:
        return self.model.denoise(z_l)


class DecodeStage(nn.Module):
    def __init__(self, model: GenDR) -> None:
        super().__init__()
        self.model = model

    def forward(self, z_g: torch.Tensor) -> torch.Tensor:
        y = self.model.decode(z_g)
        y = torch.round((y.clamp(-1.0, 1.0) + 1.0) * 127.5)
        return y.clamp(0.0, 255.0).to(torch.uint8).permute(0, 2, 3, 1)


def _export(
    module: nn.Module, example: torch.Tensor, path: Path, in_name: str, out_name: str, opset: int
) -> None:
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            (example,),
            str(path),
            input_names=[in_name],
            output_names=[out_name],
            dynamic_axes={in_name: {0: "batch"}, out_name: {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )


def _consolidate(raw: Path, out_dir: Path) -> tuple[Path, int]:
    """Write one graph (+ one data file when large) and check it like the fused export does."""
    model = onnx.load(str(raw), load_external_data=True)
    nbytes = sum(int(np.prod(t.dims)) * 4 for t in model.graph.initializer)
    import shutil

    shutil.rmtree(out_dir, ignore_errors=True)  # onnx appends to an existing external-data file
    out_dir.mkdir(parents=True)
    path = out_dir / "model.onnx"
    if nbytes > (1 << 30):
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location="model.onnx.data",
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(path))
    del model
    onnx.checker.check_model(str(path), full_check=True)
    size = sum(p.stat().st_size for p in out_dir.iterdir())
    return path, size


def export_stages(model: GenDR, tile: int, out_dir: Path, opset: int = DEFAULT_OPSET) -> dict[str, Any]:
    """Export encoder / UNet / decoder graphs under out_dir/<stage>/model.onnx; returns timings and sizes."""
    import shutil
    import tempfile

    lat = tile // 8
    c = model.latent_channels
    specs = [
        (
            "encoder",
            EncodeStage(model),
            torch.randint(0, 256, (2, tile, tile, 3), dtype=torch.uint8),
            "lr_tile",
            "z_l",
        ),
        ("unet", UNetStage(model), torch.randn(2, c, lat, lat), "z_l", "z_g"),
        ("decoder", DecodeStage(model), torch.randn(2, c, lat, lat), "z_g", "sr_tile"),
    ]
    report: dict[str, Any] = {}
    for name, module, example, i, o in specs:
        t0 = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(dir=out_dir.parent if out_dir.parent.exists() else None))
        try:
            _export(module, example, tmp / "model.onnx", i, o, opset)
            _, size = _consolidate(tmp / "model.onnx", out_dir / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        report[name] = {"export_seconds": round(time.perf_counter() - t0, 2), "bytes": size}
    return report


class StagesRunner:
    """ONNX Runtime over the three stage graphs (host round trip between stages, like separate engines)."""

    def __init__(self, out_dir: Path, threads: int = 0) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        self.sessions = [
            ort.InferenceSession(str(out_dir / s / "model.onnx"), so, providers=["CPUExecutionProvider"])
            for s in ("encoder", "unet", "decoder")
        ]
        self.seconds = [0.0, 0.0, 0.0]

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        x = batch
        for k, s in enumerate(self.sessions):
            t0 = time.perf_counter()
            x = s.run(None, {s.get_inputs()[0].name: x})[0]
            self.seconds[k] += time.perf_counter() - t0
        return x


def measure_stages(
    model: GenDR,
    tile: int,
    out_dir: Path,
    fused_repo: Path,
    tiles: np.ndarray,
    opset: int = DEFAULT_OPSET,
    repeats: int = 1,
) -> dict[str, Any]:
    """Export the stages, then time fused vs staged on `tiles` in ORT CPU and compare outputs.

    `fused_repo` is the model repository whose fp32 graph is the fused one (run by the service backend).
    """
    from engine_build.verify.parity import compare, onnx_runner

    report: dict[str, Any] = {"tile": tile, "stages": export_stages(model, tile, out_dir, opset)}
    fused = onnx_runner(fused_repo, "fp32")
    staged = StagesRunner(out_dir)
    fused(tiles[:1])
    staged(tiles[:1])  # warm-up (first-run allocations)
    staged.seconds = [0.0, 0.0, 0.0]
    t0 = time.perf_counter()
    for _ in range(repeats):
        a = fused(tiles)
    t_fused = (time.perf_counter() - t0) / repeats / len(tiles)
    t0 = time.perf_counter()
    for _ in range(repeats):
        b = staged(tiles)
    t_staged = (time.perf_counter() - t0) / repeats / len(tiles)
    n = repeats * len(tiles)
    report.update(
        {
            "fused_seconds_per_tile": round(t_fused, 4),
            "staged_seconds_per_tile": round(t_staged, 4),
            "staged_stage_seconds_per_tile": {
                s: round(v / n, 4)
                for s, v in zip(("encoder", "unet", "decoder"), staged.seconds, strict=True)
            },
            "fused_vs_staged": compare(a, b),
            "latent_bytes_per_tile": int(model.latent_channels * (tile // 8) ** 2 * 4),
            "tile_bytes_in_out": int(tile * tile * 3 * 2),
        }
    )
    return report
