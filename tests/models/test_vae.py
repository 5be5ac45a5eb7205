"""Encoding through the model's VAE, with and without the decoder fit (semi-amortised encoding)."""

import torch

from pipeline.models.vae import decode_latents, encode_images


def pixel_errors(model, images: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """Per image, the mean squared error (0..255 pixels) of the decoded latents."""
    return (decode_latents(model, latents).float() - images.float()).pow(2).mean(dim=(1, 2, 3))


def test_the_fit_starts_from_the_scaled_posterior_mean_and_draws_every_image_better(tiny_sd, images):
    batch = images[:3]
    pixels = batch.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        mean = tiny_sd.vae.encode(pixels).latent_dist.mean
    encoded = encode_images(tiny_sd, batch)
    torch.testing.assert_close(encoded, mean * tiny_sd.vae.config.scaling_factor)
    fitted = encode_images(tiny_sd, batch, fit_steps=30, fit_lr=0.05)
    assert fitted.shape == encoded.shape and fitted.dtype == torch.float32
    assert bool((pixel_errors(tiny_sd, batch, fitted) < pixel_errors(tiny_sd, batch, encoded)).all())
    assert all(parameter.grad is None for parameter in tiny_sd.vae.parameters())
