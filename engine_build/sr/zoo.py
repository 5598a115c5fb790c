"""The SR model zoo: one tiny, seeded network per spandrel architecture and variant.

Each :class:`ZooEntry` builds the architecture with small hyper-parameters of the same *shape* as
the checkpoints users download (the ×2/×4 variants, the window sizes, the upsampler), so spandrel's
key/shape detection sees what it sees in a real file, but export and ONNX Runtime take seconds.
The harness (:mod:`engine_build.sr_zoo_run`) writes each network as a safetensors checkpoint and
runs it through ``import-sr`` → ONNX → parity → the served runtime.

Architectures that are not image → image (face restoration, inpainting) are listed too: importing
them must fail with one clear line, and the harness checks that it does.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["ZOO", "ZooEntry", "entries", "seeded_weights"]


@dataclass(frozen=True)
class ZooEntry:
    """One row of the coverage table: an architecture, a variant, and how to build it."""

    arch: str  # spandrel architecture id
    variant: str  # e.g. "x4", "x2 light", "denoise"
    family: str  # "CNN", "transformer", "GAN", "restoration", ...
    module: str  # spandrel.architectures.<module>
    cls: str  # the nn.Module class in that module
    kwargs: dict[str, Any] = field(default_factory=dict)
    scale: int = 4  # what spandrel must detect
    expect_refusal: bool = False  # face restoration / inpainting: import-sr must refuse it
    weight_std: float | None = 0.05  # None: keep the architecture's own init

    @property
    def key(self) -> str:
        return f"{self.arch} {self.variant}"

    @property
    def slug(self) -> str:
        return f"{self.arch}-{self.variant}".lower().replace(" ", "-").replace("×", "x")

    def build(self, seed: int = 0) -> nn.Module:
        mod = importlib.import_module(f"spandrel.architectures.{self.module}")
        torch.manual_seed(seed)
        net = getattr(mod, self.cls)(**self.kwargs)
        if self.weight_std is not None:
            seeded_weights(net, seed, self.weight_std)
        return net.eval()


def seeded_weights(net: nn.Module, seed: int, std: float) -> nn.Module:
    """Deterministic random weights: N(0, std) for matrices and kernels, 1 ± std for norm scales.

    The architectures' own inits differ between spandrel versions and some draw all-zero last
    layers (the output would be a constant and every comparison trivially pass).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if not p.requires_grad:  # fixed constants (RGB mean shifts): keep them
                continue
            noise = torch.randn(p.shape, generator=g) * std
            if p.ndim == 1 and ("norm" in name or name.endswith(".weight")) and not name.endswith("bias"):
                p.copy_(1.0 + noise)  # LayerNorm / BatchNorm / PReLU-like scales
            else:
                p.copy_(noise)
        for name, b in net.named_buffers():
            if name.endswith("running_var"):
                b.fill_(1.0)
            elif name.endswith("running_mean"):
                b.zero_()
    return net


def _e(
    arch: str,
    variant: str,
    family: str,
    cls: str | None = None,
    *,
    x: int,
    refuse: bool = False,
    std: float | None = 0.05,
    **kw: Any,
) -> ZooEntry:
    return ZooEntry(arch, variant, family, arch, cls or arch, kw, x, refuse, std)


def _sr_pair(arch: str, family: str, cls: str | None, scale_key: str, **kw: Any) -> list[ZooEntry]:
    return [_e(arch, f"x{s}", family, cls, x=s, **{scale_key: s}, **kw) for s in (4, 2)]


_SWIN = {"img_size": 32, "embed_dim": 24, "depths": [2], "num_heads": [2], "window_size": 8}
_SMALL_UNET = {"width": 16, "middle_blk_num": 1, "enc_blk_nums": [1, 1], "dec_blk_nums": [1, 1]}

# fmt: off
ZOO: list[ZooEntry] = [
    # ---- CNN super-resolution
    *_sr_pair("ESRGAN", "CNN", None, "scale", num_filters=16, num_blocks=1, std=0.1),
    *_sr_pair("Compact", "CNN", None, "upscale", num_feat=16, num_conv=4),
    *_sr_pair("SwiftSRGAN", "CNN", None, "upscale_factor", num_channels=16, num_blocks=2, std=0.2),
    *_sr_pair("SPAN", "CNN", None, "upscale", num_in_ch=3, num_out_ch=3, feature_channels=16),
    *_sr_pair("RCAN", "CNN", None, "scale", n_resgroups=1, n_resblocks=1, n_feats=16, reduction=4, std=0.15),
    *_sr_pair("PLKSR", "CNN", None, "upscaling_factor", dim=16, n_blocks=2, kernel_size=9),
    *_sr_pair("SAFMN", "CNN", None, "upscaling_factor", dim=16, n_blocks=2),
    *_sr_pair("MoSR", "CNN", None, "upscale", n_block=2, dim=16),
    *_sr_pair("MoESR", "CNN", None, "scale", dim=16, n_blocks=1, n_block=1, upsample_dim=16),
    *_sr_pair("SeemoRe", "CNN", None, "scale", num_experts=2, num_layers=1, embedding_dim=16),
    *_sr_pair("DCTLSA", "CNN", None, "upscale", nf=20, num_modules=6, num_head=5),
    _e("RealCUGAN", "x2 fast", "CNN", "UpCunet2x_fast", x=2),
    _e("RealCUGAN", "x2", "CNN", "UpCunet2x", x=2),
    _e("RealCUGAN", "x3", "CNN", "UpCunet3x", x=3),
    _e("RealCUGAN", "x4", "CNN", "UpCunet4x", x=4),
    _e("MMRealSR", "x4", "GAN", x=4, num_in_ch=3, num_out_ch=3, num_feat=16, num_block=1,
       num_feats=[16, 32, 64, 128], num_blocks=[1, 1, 1, 1], std=0.15),
    _e("AuraSR", "x4", "GAN", x=4, dim=16, image_size=64, input_image_size=16,
       style_network={"dim_in": 16, "dim_out": 64, "depth": 2}, up_dim_mults=(1, 2, 2, 4, 4),
       down_dim_mults=(2, 4, 4), full_attn=(False, False, False, False, True), self_attn_dim_head=8,
       attn_depths=(2, 2, 2, 2, 1), mid_attn_depth=1, num_conv_kernels=2, std=0.1),
    # ---- window / stripe / channel attention transformers
    *_sr_pair("SwinIR", "transformer", None, "upscale", upsampler="pixelshuffle", **_SWIN),
    _e("SwinIR", "x2 light", "transformer", x=2, upscale=2, upsampler="pixelshuffledirect", **_SWIN),
    *_sr_pair("Swin2SR", "transformer", None, "upscale", upsampler="pixelshuffle", **_SWIN),
    *_sr_pair("HAT", "transformer", None, "upscale", img_size=32, embed_dim=30, depths=(2,),
              num_heads=(2,), window_size=8, num_feat=16),
    *_sr_pair("DRCT", "transformer", None, "upscale", img_size=32, embed_dim=24, depths=(2,),
              num_heads=(2,), window_size=8, upsampler="pixelshuffle", gc=8),
    *_sr_pair("ATD", "transformer", None, "upscale", img_size=32, embed_dim=24, depths=(2,),
              num_heads=(2,), window_size=8, category_size=32, num_tokens=16, upsampler="pixelshuffle"),
    *_sr_pair("DAT", "transformer", None, "upscale", img_size=32, embed_dim=64, depth=[2],
              num_heads=[2], split_size=[2, 4]),
    *_sr_pair("RGT", "transformer", None, "upscale", img_size=32, embed_dim=64, depth=[2],
              num_heads=[2], split_size=[8, 8]),
    *_sr_pair("CRAFT", "transformer", None, "upscale", embed_dim=48, depths=[1], num_heads=[2]),
    *_sr_pair("OmniSR", "transformer", None, "up_scale", num_feat=16, block_num=1, window_size=8),
    *_sr_pair("DITN", "transformer", None, "upscale", dim=24, ITL_blocks=1, SAL_blocks=1),
    *_sr_pair("FDAT", "transformer", None, "scale", embed_dim=24, num_groups=1, depth_per_group=1,
              num_heads=2, window_size=8, mid_dim=16),
    _e("GRL", "x4", "transformer", x=4, img_size=32, embed_dim=16, upscale=4, upsampler="pixelshuffle",
       depths=[1], num_heads_window=[1], num_heads_stripe=[1], window_size=8, stripe_size=[8, 8]),
    _e("IPT", "x2", "transformer", x=2, n_feats=16, num_heads=2, num_layers=1, patch_size=48, scale=[2]),
    # ---- scale-1 restoration: denoise, JPEG, deblur, dehaze, low light, colour
    _e("DnCNN", "denoise", "restoration", x=1, in_nc=3, out_nc=3, nc=16, nb=17),
    _e("DnCNN", "FDnCNN", "restoration", x=1, in_nc=4, out_nc=3, nc=16, nb=17, mode="FDnCNN"),
    _e("DRUNet", "denoise", "restoration", x=1, in_nc=4, out_nc=3, nc=[16, 32, 64, 128], nb=2),
    _e("FBCNN", "JPEG", "restoration", x=1, nc=[16, 32, 64, 512], nb=2),
    _e("SCUNet", "denoise", "restoration", x=1, config=[1, 1, 1, 1, 1, 1, 1], dim=64),
    _e("NAFNet", "denoise", "restoration", x=1, **_SMALL_UNET),
    _e("KBNet", "s", "restoration", "KBNet_s", x=1, **_SMALL_UNET),
    _e("KBNet", "l", "restoration", "KBNet_l", x=1, dim=48, num_blocks=[1, 1, 1, 1],
       num_refinement_blocks=1, heads=[1, 2, 4, 8]),
    _e("Uformer", "denoise", "restoration", x=1, img_size=128, embed_dim=16, depths=[1] * 9,
       num_heads=[1, 2, 4, 8, 16, 16, 8, 4, 2], win_size=8),
    _e("FFTformer", "deblur", "restoration", x=1, dim=16, num_blocks=[1, 1, 1], num_refinement_blocks=1),
    _e("MixDehazeNet", "dehaze", "restoration", x=1, embed_dims=[8, 16, 32, 16, 8], depths=[1, 1, 1, 1, 1]),
    _e("RetinexFormer", "low light", "restoration", x=1, n_feat=16, stage=1, num_blocks=[1, 1, 1]),
    _e("HVICIDNet", "low light", "restoration", x=1, channels=[12, 12, 24, 48], heads=[1, 2, 4, 8]),
    _e("SAFMNBCIE", "BCIE", "restoration", x=1, dim=16, n_blocks=1, num_layers=1, upscaling_factor=2),
    # ---- not image → image: import-sr must refuse them
    _e("GFPGAN", "face", "face restoration", x=1, refuse=True, std=None),
    _e("RestoreFormer", "face", "face restoration", x=1, refuse=True, std=None),
    _e("LaMa", "inpaint", "inpainting", x=1, refuse=True, std=None),
]
# fmt: on


def entries(names: list[str] | None = None) -> list[ZooEntry]:
    """The zoo, or the entries whose architecture id or key is in ``names`` (case-insensitive)."""
    if not names:
        return list(ZOO)
    want = {n.lower() for n in names}
    out = [e for e in ZOO if e.arch.lower() in want or e.key.lower() in want or e.slug in want]
    missing = want - {e.arch.lower() for e in out} - {e.key.lower() for e in out} - {e.slug for e in out}
    if missing:
        raise ValueError(f"unknown zoo entries {sorted(missing)}; known: {sorted({e.arch for e in ZOO})}")
    return out


BuildFn = Callable[[int], nn.Module]
