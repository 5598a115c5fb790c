"""The safetensors SR importer (engine_build.sr.models.load_sr_safetensors): detection, refusals, pickles."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import safetensors.torch

torch = pytest.importorskip("torch")
pytest.importorskip("spandrel")

from spandrel.architectures.Compact import Compact  # noqa: E402
from spandrel.architectures.ESRGAN import ESRGAN as RRDBNet  # noqa: E402
from sr_test_helpers import seeded  # noqa: E402

from engine_build.sr import models as sr_models  # noqa: E402
from engine_build.sr.models import (  # noqa: E402
    SRModelError,
    load_sr_safetensors,
    read_sr_metadata,
    save_sr_checkpoint,
)


@pytest.mark.parametrize(
    ("make", "arch", "scale"),
    [
        (lambda: RRDBNet(num_filters=8, num_blocks=1, scale=4), "ESRGAN", 4),
        (lambda: RRDBNet(num_filters=8, num_blocks=2, scale=1), "ESRGAN", 1),
        (lambda: Compact(num_feat=8, num_conv=2, upscale=2), "Compact", 2),
    ],
    ids=["rrdbnet-x4", "rrdbnet-x1", "compact-x2"],
)
def test_small_random_spandrel_model_round_trips(tmp_path: Path, make, arch: str, scale: int) -> None:
    net = seeded(make())
    path = save_sr_checkpoint(
        net.state_dict(),
        tmp_path / "tiny.safetensors",
        architecture=arch,
        scale=scale,
        source="test",
        license="MIT",
    )
    assert read_sr_metadata(path)["scale"] == str(scale)
    desc = load_sr_safetensors(path)
    assert desc.architecture.id == arch
    assert desc.scale == scale and desc.input_channels == desc.output_channels == 3
    x = torch.rand(1, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.allclose(desc.model(x), net(x), atol=1e-6)


def test_unsupported_architecture_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "mystery.safetensors"
    save_sr_checkpoint(
        {"encoder.weight": torch.zeros(4, 4)}, path, architecture="?", scale=1, source="test", license="MIT"
    )
    with pytest.raises(SRModelError, match="does not recognise this architecture"):
        load_sr_safetensors(path)


def test_non_rgb_model_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "gray.safetensors"
    net = RRDBNet(in_nc=1, out_nc=1, num_filters=8, num_blocks=1, scale=2)
    save_sr_checkpoint(net.state_dict(), path, architecture="ESRGAN", scale=2, source="test", license="MIT")
    with pytest.raises(SRModelError, match=r"1 → 1 channels"):
        load_sr_safetensors(path)


def test_scale_outside_1_to_8_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x16.safetensors"
    net = RRDBNet(num_filters=4, num_blocks=1, scale=16)
    save_sr_checkpoint(net.state_dict(), path, architecture="ESRGAN", scale=16, source="test", license="MIT")
    with pytest.raises(SRModelError, match=r"scale 16.*1\.\.8"):
        load_sr_safetensors(path)


def test_scale_contradicting_the_checkpoint_metadata_is_refused(tmp_path: Path) -> None:
    # An ESRGAN ×3 has exactly the weights of an ×2 (nearest upsampling has none): spandrel 0.4 detects ×2.
    # Our own checkpoints record the scale, so the contradiction is caught instead of serving ×2.
    path = tmp_path / "x3.safetensors"
    net = RRDBNet(num_filters=8, num_blocks=1, scale=3)
    save_sr_checkpoint(net.state_dict(), path, architecture="ESRGAN", scale=3, source="test", license="MIT")
    try:
        desc = load_sr_safetensors(path)
    except SRModelError as e:
        assert "says ESRGAN ×3 but spandrel detects ESRGAN ×2" in str(e)
    else:  # a later spandrel that gets it right
        assert desc.scale == 3


def test_probe_catches_a_wrong_detected_scale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    net = Compact(num_feat=8, num_conv=1, upscale=2)
    foreign = tmp_path / "foreign.safetensors"
    safetensors.torch.save_file(net.state_dict(), str(foreign))  # no metadata: only the probe can tell

    class Lying(sr_models.ModelLoader):
        def load_from_state_dict(self, state_dict):
            desc = super().load_from_state_dict(state_dict)
            desc.scale = 4
            return desc

    monkeypatch.setattr(sr_models, "ModelLoader", Lying)
    with pytest.raises(SRModelError, match=r"detected as ×4 but maps a 8×8 input to \(16, 16\)"):
        load_sr_safetensors(foreign)


_UNPICKLED: list[str] = []


def _record_unpickling(marker: str) -> dict:
    _UNPICKLED.append(marker)
    Path(marker).write_text("unpickled!")
    return {}


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (_record_unpickling, (self.marker,))


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".ckpt", ".pkl", ".bin"])
def test_pickle_files_are_refused_without_unpickling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str
) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / f"model{suffix}"
    path.write_bytes(pickle.dumps({"params_ema": _Payload(str(marker))}))

    def forbidden(*a, **k):
        raise AssertionError("tried to unpickle")

    for mod, attr in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")]:
        monkeypatch.setattr(mod, attr, forbidden)
    with pytest.raises(SRModelError) as info:
        load_sr_safetensors(path)
    msg = str(info.value)
    assert "pickle" in msg and "never loaded" in msg
    assert "safetensors" in msg and "weights_only=True" in msg and "model.safetensors" in msg
    assert not marker.exists() and not _UNPICKLED


def test_pickle_bytes_named_safetensors_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "disguised.safetensors"
    path.write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(SRModelError, match="not a valid safetensors file"):
        load_sr_safetensors(path)
    assert not marker.exists()


def test_other_suffixes_and_missing_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SRModelError, match=r"expected a \.safetensors checkpoint"):
        load_sr_safetensors(tmp_path / "model.onnx")
    with pytest.raises(SRModelError, match="no such file"):
        load_sr_safetensors(tmp_path / "absent.safetensors")
    with pytest.raises(SRModelError, match=r"\.safetensors"):
        save_sr_checkpoint({}, tmp_path / "x.pth", architecture="ESRGAN", scale=4, source="t", license="MIT")
