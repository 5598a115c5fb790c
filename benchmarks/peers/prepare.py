"""The models of both engines, built once under benchmarks/peers/.work (runs in the project's .venv).

- cost model: our repository is a manifest only (kind single, ×4, tile 128, overlap 16), served by
  `GENDR_BACKEND=fake`; the peers need nothing.
- ONNX CPU: a compact ×4 CNN (spandrel's SRVGGNetCompact) with seeded random weights, saved as
  .safetensors; our repository comes from `gendr-build import-sr` (with shape buckets / whole-image
  graphs when the installed gendr-build offers them), the peers' dynamic-H/W ONNX from
  torch.onnx.export of the same weights (uint8 NHWC in and out, like our graphs).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORK = Path(__file__).resolve().parent / ".work"
#: SRVGGNetCompact size: one ~0.8 MP image in well under two seconds on 2 cores (see README).
NUM_FEAT, NUM_CONV = 16, 4
FAKE_MODEL = "fake-x4"
SR_MODEL = "compact-x4"


def fake_repo(work: Path = WORK) -> Path:
    """Repository of one manifest-only ×4 model for the fake backend."""
    sys.path.insert(0, str(ROOT))
    from service.manifest import Manifest, TileGeometry, write_manifest

    repo = work / "models-fake"
    m = Manifest(
        name=FAKE_MODEL,
        kind="single",
        native_scale=4,
        tile=TileGeometry(tile=128, overlap=16, graph_scale=4, size_multiple=8),
    )
    write_manifest(repo / FAKE_MODEL, m)
    return repo


def _network() -> object:
    import torch
    from spandrel.architectures.Compact import Compact

    net = Compact(num_feat=NUM_FEAT, num_conv=NUM_CONV, upscale=4)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return net.eval()


def checkpoint(work: Path = WORK) -> Path:
    sys.path.insert(0, str(ROOT))
    from engine_build.sr.models import save_sr_checkpoint

    path = work / "compact-x4.safetensors"
    if not path.is_file():
        save_sr_checkpoint(
            _network().state_dict(),  # type: ignore[attr-defined]
            path,
            architecture="Compact",
            scale=4,
            source="benchmarks/peers (seeded random weights)",
            license="Apache-2.0",
        )
    return path


def peer_onnx(ckpt: Path, work: Path = WORK) -> Path:
    """uint8 [B, H, W, 3] → uint8 [B, 4H, 4W, 3] with dynamic B, H, W, from the checkpoint's weights."""
    import torch
    from safetensors.torch import load_file

    out = work / "compact-x4-dynamic.onnx"
    if out.is_file() and out.stat().st_mtime >= ckpt.stat().st_mtime:
        return out
    net = _network()
    net.load_state_dict(load_file(str(ckpt)))  # type: ignore[attr-defined]

    class Uint8NHWC(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.inner(x.permute(0, 3, 1, 2).float() / 255.0).clamp(0.0, 1.0)
            return torch.round(y * 255.0).permute(0, 2, 3, 1).to(torch.uint8)

    example = torch.randint(0, 256, (1, 64, 48, 3), dtype=torch.uint8)
    axes = {0: "batch", 1: "height", 2: "width"}
    with torch.no_grad():
        torch.onnx.export(
            Uint8NHWC(net).eval(),  # type: ignore[arg-type]
            (example,),
            str(out),
            input_names=["image"],
            output_names=["upscaled"],
            dynamic_axes={"image": axes, "upscaled": axes},
            opset_version=17,
            dynamo=False,
        )
    return out


def build_flags() -> list[str]:
    """Shape-bucket flags of `gendr-build import-sr`, when this checkout has them."""
    help_text = subprocess.run(
        [str(ROOT / ".venv/bin/gendr-build"), "import-sr", "--help"], capture_output=True, text=True
    ).stdout
    flags: list[str] = []
    if "--buckets" in help_text:
        flags += ["--buckets", "32,64"]
    if "--whole-image" in help_text:
        flags.append("--whole-image")
    return flags


def onnx_repo(ckpt: Path, work: Path = WORK) -> tuple[Path, list[str]]:
    """Our repository of the same network (`gendr-build import-sr`; idempotent)."""
    repo = work / "models-onnx"
    flags = build_flags()
    cmd = [str(ROOT / ".venv/bin/gendr-build"), "import-sr", str(ckpt), "--out", str(repo / SR_MODEL), *flags]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return repo, flags


def prepare(engines: list[str], work: Path = WORK) -> dict[str, object]:
    work.mkdir(parents=True, exist_ok=True)
    out: dict[str, object] = {}
    if "cost" in engines:
        out["fake_repo"] = fake_repo(work)
    if "onnx" in engines:
        ckpt = checkpoint(work)
        out["peer_onnx"] = peer_onnx(ckpt, work)
        out["onnx_repo"], out["build_flags"] = onnx_repo(ckpt, work)
    return out
