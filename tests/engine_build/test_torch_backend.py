"""The PyTorch backend (build side, registered in the service by import path): loading from a
repository, precisions, the fp32 VAE decoder, and NaN never reaching pixels."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from engine_build.gendr.checkpoint import load_checkpoint
from engine_build.torch_backend import TorchBackend
from engine_build.verify.runners import torch_runner
from service.backends import select
from service.backends.base import BackendUnavailable
from service.manifest import read_manifest
from service.settings import Settings


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def photo_tiles(photos: dict[str, np.ndarray], n: int, t: int = 64) -> np.ndarray:
    img = photos["astronaut"]
    return np.stack([img[40 * i : 40 * i + t, 50 * i : 50 * i + t] for i in range(n)])


def test_loads_the_checkpoint_from_the_repository(tiny_repo: Path, one_thread, photos) -> None:
    m = read_manifest(tiny_repo)
    be = TorchBackend(m, tiny_repo, device="cpu", max_batch=2, instances=2)
    assert be.info.name == "torch" and be.info.precision == "fp32"
    be.load()
    assert set(be.warmup()) == {(t, t, b) for t in m.tiles("fp32") for b in (1, 2)}  # every bucket too
    x = photo_tiles(photos, 2)
    ref = torch_runner(load_checkpoint(tiny_repo / "checkpoint"))(x)
    np.testing.assert_array_equal(be.infer(1, x), ref)
    bf = TorchBackend(m, tiny_repo, device="cpu", precision="bf16", max_batch=2)
    bf.load()
    y = bf.infer(0, x)
    assert y.shape == x.shape and np.abs(y.astype(int) - ref).mean() < 40  # bf16 runs, roughly agrees
    with pytest.raises(BackendUnavailable, match="fp16 on CPU"):
        TorchBackend(m, tiny_repo, device="cpu", precision="fp16").load()


def test_service_builds_it_by_name_without_importing_it(tiny_repo: Path) -> None:
    m = read_manifest(tiny_repo)
    be = select.build("torch", m, tiny_repo, Settings(model_repository=tiny_repo.parent, max_batch=3))
    assert isinstance(be, TorchBackend) and be.info.batch_sizes == (1, 2, 3)


def test_auto_precision_is_bf16_from_sm80_and_fp16_before(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = SimpleNamespace(type="cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    assert TorchBackend.auto_precision(cuda) == "bf16"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 5))
    assert TorchBackend.auto_precision(cuda) == "fp16"
    assert TorchBackend.auto_precision(SimpleNamespace(type="cpu")) == "fp32"


def test_the_manifests_fp32_decoder_is_honoured(tiny_repo: Path, photos) -> None:
    m = read_manifest(tiny_repo)
    assert "decoder_fp32" in m.onnx["fp16"].options  # the export's scan decided
    forced = m.model_copy(
        update={
            "onnx": {
                **m.onnx,
                "fp16": m.onnx["fp16"].model_copy(
                    update={"options": {**m.onnx["fp16"].options, "decoder_fp32": True}}
                ),
            }
        }
    )
    assert TorchBackend(forced, tiny_repo).decoder_fp32
    # GenDR.decode runs the decoder in its own dtype: a half-precision model with an fp32 decoder
    net = load_checkpoint(tiny_repo / "checkpoint").to(torch.bfloat16)
    net.vae.decoder.float()
    net.vae.post_quant_conv.float()
    x = torch.from_numpy(photo_tiles(photos, 1)).permute(0, 3, 1, 2).to(torch.bfloat16) / 127.5 - 1
    with torch.inference_mode():
        y = net(x)
    assert y.dtype == torch.float32 and torch.isfinite(y).all()


class _NanNet(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * float("nan")


def test_a_non_finite_output_fails_the_batch_instead_of_becoming_pixels() -> None:
    be = TorchBackend.from_module(_NanNet(), device="cpu")
    be.load()
    with pytest.raises(FloatingPointError, match="NaN"):
        be.infer(0, np.zeros((2, 16, 16, 3), np.uint8))


@pytest.mark.gpu
def test_cuda_fp16_and_bf16_agree_with_the_cpu(tiny_repo: Path, photos) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    m = read_manifest(tiny_repo)
    ref = TorchBackend(m, tiny_repo, device="cpu")
    ref.load()
    x = photo_tiles(photos, 4)
    for prec in ("fp16", "auto"):
        be = TorchBackend(m, tiny_repo, device="cuda:0", precision=prec, instances=2, max_batch=4)
        be.load()
        be.warmup()
        assert np.abs(be.infer(1, x).astype(int) - ref.infer(0, x)).mean() < 3
