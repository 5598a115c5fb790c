"""Checkpoint loading refuses anything unsafe, corrupt or inconsistent, with a message that says why."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from engine_build.gendr.checkpoint import CheckpointError, load_checkpoint, make_tiny  # noqa: E402


@pytest.fixture
def ckpt(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ck"
    shutil.copytree(tiny_checkpoint, dst)
    return dst


def _weights(ck: Path, part: str) -> Path:
    return next((ck / part).glob("*.safetensors"))


def test_make_tiny_is_deterministic(tmp_path: Path) -> None:
    a, b, c = (
        make_tiny(tmp_path / "a", seed=3),
        make_tiny(tmp_path / "b", seed=3),
        make_tiny(tmp_path / "c", seed=4),
    )
    assert _weights(a, "unet").read_bytes() == _weights(b, "unet").read_bytes()
    assert _weights(a, "unet").read_bytes() != _weights(c, "unet").read_bytes()


def test_loads_and_keeps_metadata(ckpt: Path) -> None:
    meta = json.loads((ckpt / "gendr.json").read_text())
    meta["pipeline"]["timestep"] = 250
    (ckpt / "gendr.json").write_text(json.dumps(meta))
    m = load_checkpoint(ckpt)
    assert m.params.timestep == 250 and int(m.timestep) == 250


@pytest.mark.parametrize(
    "name", ["unet/diffusion_pytorch_model.bin", "model.ckpt", "weights.pth", "x.pt", "y.pkl"]
)
def test_refuses_pickles_without_unpickling(ckpt: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    class Boom:
        def __reduce__(self):  # would run if anything unpickled the file
            return (pytest.fail, ("unpickled!",))

    (ckpt / name).write_bytes(pickle.dumps(Boom()))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("pickle.load called"))
    with pytest.raises(CheckpointError, match=r"refusing pickle.*safetensors"):
        load_checkpoint(ckpt)


def test_refuses_a_pickle_file_given_directly(tmp_path: Path) -> None:
    f = tmp_path / "gendr.ckpt"
    f.write_bytes(b"\x80\x04junk")
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(f)


def test_truncated_safetensors(ckpt: Path) -> None:
    w = _weights(ckpt, "unet")
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(ckpt)


def test_corrupt_safetensors_header(ckpt: Path) -> None:
    w = _weights(ckpt, "vae")
    data = bytearray(w.read_bytes())
    data[8:20] = b"not json!!!!"
    w.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(ckpt)


def test_wrong_channel_count(ckpt: Path) -> None:
    cfg = json.loads((ckpt / "unet" / "config.json").read_text())
    cfg["in_channels"] = cfg["out_channels"] = 4  # an SD-style 4-channel UNet with a 16-channel VAE
    (ckpt / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="latent"):
        load_checkpoint(ckpt)


def test_weights_with_wrong_shape(ckpt: Path) -> None:
    from safetensors.torch import load_file, save_file

    w = _weights(ckpt, "unet")
    state = load_file(str(w))
    state["conv_in.weight"] = torch.zeros(32, 4, 3, 3)  # 4 input channels instead of 16
    save_file(state, str(w))
    with pytest.raises(CheckpointError, match=r"conv_in.weight has shape \(32, 4, 3, 3\)"):
        load_checkpoint(ckpt)


def test_weights_that_do_not_match_config(ckpt: Path) -> None:
    cfg = json.loads((ckpt / "vae" / "config.json").read_text())
    cfg["block_out_channels"] = [16, 16, 32, 48]
    (ckpt / "vae" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"do not match config\.json"):
        load_checkpoint(ckpt)


def test_missing_parts(ckpt: Path) -> None:
    (ckpt / "prompt_embeds.safetensors").unlink()
    with pytest.raises(CheckpointError, match="prompt_embeds"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize(
    ("patch", "match"),
    [
        ({"format": "other"}, "format"),
        ({"version": 7}, "version"),
        ({"pipeline": {"timestep": 5000}}, "timestep"),
        ({"pipeline": {"alpha": 0}}, "alpha"),
        ({"pipeline": {"scaling_factor": 0.5}}, "scaling_factor"),
        ({"pipeline": {"color_fix": "sepia"}}, "color_fix"),
    ],
)
def test_metadata_errors(ckpt: Path, patch: dict, match: str) -> None:
    meta = json.loads((ckpt / "gendr.json").read_text())
    for k, v in patch.items():
        if isinstance(v, dict):
            meta[k].update(v)
        else:
            meta[k] = v
    (ckpt / "gendr.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(ckpt)


def test_metadata_not_json(ckpt: Path) -> None:
    (ckpt / "gendr.json").write_text("{nope")
    with pytest.raises(CheckpointError, match="invalid JSON"):
        load_checkpoint(ckpt)


def test_binary_config_is_a_checkpoint_error(ckpt: Path) -> None:
    (ckpt / "unet" / "config.json").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(CheckpointError, match="invalid JSON"):
        load_checkpoint(ckpt)
