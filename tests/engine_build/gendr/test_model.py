"""The GenDR architecture: parameter counts of the full-size preset and the tile graph's contract."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from engine_build.gendr.model import TileGraph, build_gendr, build_unet, build_vae, count_parameters  # noqa: E402
from engine_build.gendr.presets import GENDR_UNET, GENDR_VAE, PRESETS  # noqa: E402


def test_full_size_parameter_counts() -> None:
    # Built on the meta device: the real architecture, no 3.7 GB of weights allocated.
    with torch.device("meta"):
        unet, vae = build_unet(GENDR_UNET), build_vae(GENDR_VAE)
    assert 860e6 < count_parameters(unet) < 872e6  # paper: ≈866 M (SD2.1 UNet, 16 latent channels)
    assert 56e6 < count_parameters(vae) < 58e6  # ostris vae-kl-f8-d16: ≈57 M
    assert unet.config.in_channels == unet.config.out_channels == vae.config.latent_channels == 16
    assert unet.config.cross_attention_dim == 1024


def test_tiny_preset_is_small_and_same_classes() -> None:
    m = build_gendr("tiny", seed=0)
    assert count_parameters(m) < 2_000_000
    assert type(m.unet).__name__ == "UNet2DConditionModel"
    assert type(m.vae).__name__ == "AutoencoderKL"
    assert set(PRESETS) == {"gendr", "tiny"}


def test_tile_graph_uint8_contract() -> None:
    m = build_gendr("tiny", seed=0)
    x = torch.randint(0, 256, (2, 32, 48, 3), dtype=torch.uint8)
    with torch.inference_mode():
        y = TileGraph(m)(x)
    assert y.dtype == torch.uint8 and tuple(y.shape) == (2, 32, 48, 3)


def test_pipeline_follows_design_math() -> None:
    """z_g = (z_l − β·ε)/α between encode-mean and decode, with t_s from the metadata."""
    m = build_gendr("tiny", seed=1)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.inference_mode():
        z_l = m.encode(x)
        emb = m.prompt_embeds
        t = torch.tensor([m.params.timestep])
        eps = m.unet(z_l, t, encoder_hidden_states=emb).sample
        z_g = (z_l - m.params.beta * eps) / m.params.alpha
        expected = m.vae.decode(z_g / m.params.scaling_factor).sample.clamp(-1, 1)
        got = m(x)
    torch.testing.assert_close(got, expected)
    with torch.inference_mode():
        mean = m.vae.encode(x).latent_dist.mean * m.params.scaling_factor
    torch.testing.assert_close(z_l, mean)
