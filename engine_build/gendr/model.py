"""GenDR in PyTorch, built from diffusers classes (docs/model.md).

`GenDR` holds the VAE, the UNet, the fixed prompt embeddings and the pipeline parameters; it runs
the one-step pipeline on a [-1, 1] image. `TileGraph` wraps any image-to-image network as the
exported unit: uint8 NHWC tile in, uint8 NHWC tile out, so host↔device transfers stay small and
normalisation, layout and rounding happen inside the engine.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn

from engine_build.gendr.presets import PRESETS, PROMPT_TOKENS, VAE_FACTOR
from service.manifest import PipelineParams


def build_unet(config: dict[str, Any]) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_config(config)


def build_vae(config: dict[str, Any]) -> AutoencoderKL:
    return AutoencoderKL.from_config(config)


class GenDR(nn.Module):
    """One-step GenDR: z_g = (z_l − β·ε(z_l, t_s, c)) / α between VAE encode (mean) and decode."""

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        prompt_embeds: torch.Tensor,
        params: PipelineParams,
    ) -> None:
        super().__init__()
        self.unet = unet
        self.vae = vae
        self.params = params
        self.register_buffer("prompt_embeds", prompt_embeds.detach().clone(), persistent=False)
        self.register_buffer("timestep", torch.tensor([params.timestep], dtype=torch.long), persistent=False)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[-1,1] NCHW → scaled latent, using the posterior mean (deterministic, no sampling)."""
        h = self.vae.encoder(x)
        if self.vae.quant_conv is not None:
            h = self.vae.quant_conv(h)
        mean = h[:, : self.latent_channels]
        return mean * self.params.scaling_factor

    def denoise(self, z_l: torch.Tensor) -> torch.Tensor:
        b = z_l.shape[0]
        emb = self.prompt_embeds.to(z_l.dtype).expand(b, -1, -1)
        t = self.timestep.expand(b)
        eps = self.unet(z_l, t, encoder_hidden_states=emb, return_dict=False)[0]
        return (z_l - self.params.beta * eps) / self.params.alpha

    def decode(self, z_g: torch.Tensor) -> torch.Tensor:
        # the decoder may be kept in fp32 inside an fp16 model (its activations overflow fp16)
        z = (z_g / self.params.scaling_factor).to(self.vae.decoder.conv_in.weight.dtype)
        return self.vae.decode(z, return_dict=False)[0].clamp(-1.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [-1,1] NCHW float, H and W divisible by 8 (and by the UNet's own factor) → [-1,1]."""
        return self.decode(self.denoise(self.encode(x)))

    @property
    def size_multiple(self) -> int:
        """Pixel sizes the network accepts are multiples of this (VAE f8 × UNet downsampling)."""
        n_down = len(self.unet.config.block_out_channels) - 1
        return VAE_FACTOR * (2**n_down)


def build_gendr(preset: str, params: PipelineParams | None = None, seed: int | None = None) -> GenDR:
    """Random-weight GenDR of a preset (tests, demos, the full-size architecture check)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    if seed is not None:
        torch.manual_seed(seed)
    cfg = PRESETS[preset]
    unet = build_unet(cfg["unet"])
    vae = build_vae(cfg["vae"])
    params = params or PipelineParams(scaling_factor=float(cfg["vae"]["scaling_factor"]))
    emb = torch.randn(1, PROMPT_TOKENS, int(cfg["unet"]["cross_attention_dim"]))
    return GenDR(unet.eval(), vae.eval(), emb, params)


class TileGraph(nn.Module):
    """Exported unit: uint8 [B,H,W,3] → uint8 [B,H·s,W·s,3] around a [-1,1] → [-1,1] network."""

    def __init__(
        self, net: nn.Module, compute_dtype: torch.dtype = torch.float32, check_finite: bool = False
    ) -> None:
        super().__init__()
        self.net = net
        self.compute_dtype = compute_dtype
        self.check_finite = check_finite  # serving: NaN/Inf must fail the batch, never become pixels

    def forward(self, tile: torch.Tensor) -> torch.Tensor:
        # Cast first and last: TensorRT accepts a uint8 network input only when it feeds a Cast
        # directly, and a uint8 output only when a Cast produces it (the permutes run in float).
        if isinstance(self.net, UnitRangeAdapter):
            return self._unit_range(tile, self.net.net)
        x = tile.to(self.compute_dtype).permute(0, 3, 1, 2) / 127.5 - 1.0
        y = self.net(x).float()
        if self.check_finite and not bool(torch.isfinite(y).all()):
            raise FloatingPointError("the network produced NaN/Inf (fp16 overflow?): batch failed")
        y = torch.round((y.clamp(-1.0, 1.0) + 1.0) * 127.5)
        return y.clamp(0.0, 255.0).permute(0, 2, 3, 1).to(torch.uint8)

    def _unit_range(self, tile: torch.Tensor, net: nn.Module) -> torch.Tensor:
        """A [0,1] network (ESRGAN family) straight from uint8 and back: the same values as going through
        [-1,1], with five fewer elementwise passes over the ×s output (each is a full read and write of
        it: on a CPU they cost a compact CNN a quarter of its time per image)."""
        x = tile.to(self.compute_dtype).permute(0, 3, 1, 2) * (1.0 / 255.0)
        y = net(x).float()
        if self.check_finite and not bool(torch.isfinite(y).all()):
            raise FloatingPointError("the network produced NaN/Inf (fp16 overflow?): batch failed")
        return torch.round(y.clamp(0.0, 1.0) * 255.0).permute(0, 2, 3, 1).to(torch.uint8)


class UnitRangeAdapter(nn.Module):
    """Adapts a [0,1]-in/[0,1]-out network (ESRGAN family) to the [-1,1] convention of TileGraph."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x + 1.0) * 0.5) * 2.0 - 1.0


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
