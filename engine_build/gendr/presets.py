"""Architecture presets for GenDR (diffusers configs) and the pipeline metadata defaults.

`gendr` is the published architecture (SD2.1 UNet with 16 latent channels + the 16-channel f8 VAE,
docs/model.md). `tiny` uses the same classes at a few MB so tests and demos run on a laptop CPU.
"""

from __future__ import annotations

from typing import Any

# Tiling defaults, the one place they are set (export, the reference CLI, import-sr and default read them).
#: GenDR: 512-px tiles = the 512² training crops and SD2.1's native 64×64 latent; 64-px overlap = 8
#: latent pixels of context/blending on each side (docs/model.md).
GENDR_TILE = 512
GENDR_OVERLAP = 64
#: Single SR networks: 96 px costs the least CPU time per output megapixel for Real-ESRGAN ×4plus on
#: 2 cores once overlap and padding waste are counted (docs/default-model.md, "Tile size on CPU");
#: overlap 16 ≥ Real-ESRGAN's own tile_pad of 10. import-sr raises both for wider receptive fields.
SR_TILE = 96
SR_OVERLAP = 16
# Shape buckets (docs/export.md "Shape buckets"): the same network at smaller static tiles, so a small
# image runs on the smallest tile that holds it instead of being padded up to the primary tile. Presets
# are dropped silently where they do not fit (not below the tile, not a multiple of the network's);
# an explicit --buckets value that does not fit is an error.
#: GenDR: one bucket at half the 512 tile (a 32² latent): an image ≤ 256 px costs ¼ of a 512 call.
GENDR_BUCKETS: tuple[int, ...] = (256,)
#: Single SR networks: images up to 64 px (thumbnails, icons, crops) on a 64 tile instead of 96 (0.44× the
#: pixels); with the whole-image graph below, 64–128 px images run in one call at their own size. Each
#: bucket is one more trace and one more copy of the weights: on the default model (Real-ESRGAN, 67 MB)
#: t32 and t64 cost 19 s and 13 s of export on 2 cores and the whole-image graph 21 s with its parity
#: check, so the default keeps one bucket (docs/default-model.md).
SR_BUCKETS: tuple[int, ...] = (64,)
#: Whole-image graph (dynamic H/W, ONNX Runtime only) for SR networks whose cost is ~linear in pixels:
#: spandrel architecture ids of plain CNNs. Others (window attention: SwinIR, HAT, DAT, …) get none
#: unless --whole-image asks, and the export refuses it when its parity check fails.
SR_WHOLE_IMAGE_ARCHS: frozenset[str] = frozenset(
    {
        "ESRGAN",
        "Compact",
        "SwiftSRGAN",
        "SPAN",
        "PLKSR",
        "MoSR",
        "MoESR",
        "SeemoRe",
        "RealCUGAN",
        "SAFMN",
        "RCAN",
    }
)

GENDR_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 16,
    "out_channels": 16,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
    "upcast_attention": True,
    "norm_num_groups": 32,
}

GENDR_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 128, 256, 512],
    "layers_per_block": 2,
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.2614,
}

TINY_UNET: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 16,
    "out_channels": 16,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "attention_head_dim": [2, 4],
    "cross_attention_dim": 32,
    "use_linear_projection": True,
    "upcast_attention": True,
    "norm_num_groups": 8,
}

TINY_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [16, 16, 32, 32],
    "layers_per_block": 1,
    "latent_channels": 16,
    "norm_num_groups": 8,
    "sample_size": 128,
    "scaling_factor": 0.2614,
}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "gendr": {"unet": GENDR_UNET, "vae": GENDR_VAE},
    "tiny": {"unet": TINY_UNET, "vae": TINY_VAE},
}

# Sequence length of the fixed prompt embeddings (CLIP tokenizer length used by SD2.1).
PROMPT_TOKENS = 77
# VAE downsampling factor (f8): every latent-space size is pixel size / 8.
VAE_FACTOR = 8
