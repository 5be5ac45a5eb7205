"""Images <-> latents through the model's VAE: z_0 = ENC(x) * scaling_factor and its inverse.

`encode_images(..., fit_steps=K)` refines z_0 by K Adam steps until the decoder draws the image
(`pipeline.diffusion.decoder_fit`): semi-amortised encoding, for images the encoder was not trained on.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL

from pipeline.diffusion.decoder_fit import DEFAULT_LR, fit_latents
from pipeline.models.loading import DiffusionModel


def encode_images(
    model: DiffusionModel, images: torch.Tensor, fit_steps: int = 0, fit_lr: float = DEFAULT_LR
) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> z_0 = ENC(x) * scaling_factor, (B, C, h, w), float32.

    The posterior mean; with `fit_steps` > 0, refined by that many Adam steps (step size `fit_lr`, in
    scaled latent units) on the decoder's reconstruction error, each image's best latent kept.
    """
    pixels = images.permute(0, 3, 1, 2)
    if model.device.type == "cuda":
        # uint8 from page-locked memory: a quarter of float32's bytes, copied without a staging buffer.
        pixels = pixels.pin_memory()
    pixels = pixels.to(model.device, non_blocking=True).to(model.vae.dtype) / 127.5 - 1.0
    with torch.no_grad():
        latents = model.vae.encode(pixels).latent_dist.mean
    return refine_latents(model.vae, pixels, to_scaled(model.vae, latents), fit_steps, fit_lr)


def to_scaled(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """The VAE's latents (B, C, h, w) in the diffusion's units: (z - shift_factor) * scaling_factor, float32."""
    return ((latents - _shift_factor(vae)) * vae.config.scaling_factor).float()


def from_scaled(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """`to_scaled`'s inverse, in the VAE's dtype: what its decoder takes."""
    return latents.to(vae.dtype) / vae.config.scaling_factor + _shift_factor(vae)


def _shift_factor(vae: AutoencoderKL) -> float:
    return getattr(vae.config, "shift_factor", None) or 0.0


def refine_latents(
    vae: AutoencoderKL, pixels: torch.Tensor, latents: torch.Tensor, steps: int, lr: float = DEFAULT_LR
) -> torch.Tensor:
    """Scaled latents (B, C, h, w) after `steps` Adam steps of `decoder_fit.fit_latents` on `pixels`.

    Args:
        vae: the autoencoder whose decoder draws the latents.
        pixels: (B, 3, H, W) in [-1, 1].
        latents: (B, C, h, w) in the diffusion's units, (ENC(x) - shift_factor) * scaling_factor.
        steps: Adam steps; 0 returns `latents` (as float32).
        lr: Adam's step size in those units.
    """

    def decode(candidate: torch.Tensor) -> torch.Tensor:
        return vae.decode(from_scaled(vae, candidate)).sample

    return fit_latents(decode, pixels, latents, steps, lr)


def decode_latents(model: DiffusionModel, latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) latents -> (B, H, W, 3) uint8 images on the CPU."""
    with torch.no_grad():
        pixels = model.vae.decode(from_scaled(model.vae, latents)).sample
    pixels = ((pixels.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu()
