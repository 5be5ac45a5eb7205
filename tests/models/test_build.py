"""The SD-scale benchmark architecture is Stable Diffusion 1.5's, counted without allocating it; a UNet
whose top levels have no attention (SDXL's layout) attends only below them."""

import pytest
import torch
from attention_sides import attention_calls

from pipeline.models.build import SD15_ARCHITECTURE, SDArchitecture, build_text_encoder, build_unet, build_vae


def _parameters(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def test_sd15_architecture_has_sd15s_parameter_counts_and_latent_size():
    # The counts of runwayml/stable-diffusion-v1-5's unet, vae and text_encoder folders.
    with torch.device("meta"):
        unet = build_unet(SD15_ARCHITECTURE)
        vae = build_vae(SD15_ARCHITECTURE)
        text_encoder = build_text_encoder(SD15_ARCHITECTURE, vocab_size=49408)
    assert _parameters(unet) == 859_520_964
    assert _parameters(vae) == 83_653_863
    assert _parameters(text_encoder) == 123_060_480
    assert SD15_ARCHITECTURE.latent_size == 64
    assert unet.config.cross_attention_dim == text_encoder.config.hidden_size == 768


@pytest.mark.parametrize(
    ("plain_levels", "sides"),
    [
        (0, {16, 8, 4}),  # SD 1.5's layout: every level but the lowest, and the mid block
        (1, {8, 4}),  # SDXL's: the full-resolution level has no attention
        (2, {4}),  # only the mid block attends
    ],
)
def test_plain_levels_take_attention_off_the_top_levels_only(plain_levels, sides):
    arch = SDArchitecture(
        image_size=32, vae_channels=(8, 16), unet_channels=(16, 16, 32), unet_plain_levels=plain_levels,
        text_width=16,
    )  # fmt: skip
    unet = build_unet(arch)
    # a forward pass meets self- and cross-attention at exactly these sides, and nowhere else
    assert attention_calls(unet, arch.latent_size) == {
        (side, cross) for side in sides for cross in (False, True)
    }
    assert unet.config.down_block_types[:plain_levels] == ("DownBlock2D",) * plain_levels
    assert (
        unet.config.up_block_types[len(arch.unet_channels) - plain_levels :] == ("UpBlock2D",) * plain_levels
    )


@pytest.mark.parametrize("plain_levels", [-1, 3])
def test_plain_levels_outside_the_unets_levels_are_refused_naming_the_range(plain_levels):
    with pytest.raises(
        ValueError, match=rf"^unet_plain_levels must be between 0 and 2 .*got {plain_levels}$"
    ):
        SDArchitecture(unet_channels=(16, 16, 32), unet_plain_levels=plain_levels)
