"""Encoding through the model's VAE, with and without the decoder fit (semi-amortised encoding)."""

import copy
import dataclasses

import torch

from pipeline.diffusion.decoder_fit import fit_latents
from pipeline.models.vae import decode_latents, encode_images


def pixel_errors(model, images: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """Per image, the mean squared error (0..255 pixels) of the decoded latents."""
    return (decode_latents(model, latents).float() - images.float()).pow(2).mean(dim=(1, 2, 3))


def test_the_fit_starts_from_the_scaled_posterior_mean_and_draws_every_image_better(tiny_sd, images):
    vae = copy.deepcopy(tiny_sd.vae)
    vae.register_to_config(scaling_factor=0.2)  # SD's is 0.18215: the fit must decode in the VAE's units
    model = dataclasses.replace(tiny_sd, vae=vae)
    batch = images[:3]
    pixels = batch.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        mean = vae.encode(pixels).latent_dist.mean
    encoded = encode_images(model, batch)
    torch.testing.assert_close(encoded, mean * 0.2)
    fitted = encode_images(model, batch, fit_steps=30, fit_lr=0.01)
    assert fitted.shape == encoded.shape and fitted.dtype == torch.float32
    assert bool((pixel_errors(model, batch, fitted) < pixel_errors(model, batch, encoded)).all())
    assert all(parameter.grad is None for parameter in vae.parameters())
    # Adam's steps do not depend on the latents' units: fitting the unscaled latent at lr / scale is the
    # same fit, which pins the decoder's input to latents / scaling_factor.
    unscaled = fit_latents(lambda latents: vae.decode(latents).sample, pixels, mean, 30, lr=0.01 / 0.2)
    torch.testing.assert_close(fitted / 0.2, unscaled, rtol=0, atol=1e-2)  # moves of up to ~1.5
