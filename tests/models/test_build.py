"""The SD-scale benchmark architecture is Stable Diffusion 1.5's, counted without allocating it."""

import torch

from pipeline.models.build import SD15_ARCHITECTURE, build_text_encoder, build_unet, build_vae


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
