"""Images <-> latents through the model's VAE: z_0 = ENC(x) * scaling_factor and its inverse."""

from __future__ import annotations

import torch

from pipeline.models.loading import DiffusionModel


def encode_images(model: DiffusionModel, images: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> z_0 = ENC(x) * scaling_factor, (B, C, h, w); the posterior mean."""
    pixels = images.permute(0, 3, 1, 2)
    if model.device.type == "cuda":
        # uint8 from page-locked memory: a quarter of float32's bytes, copied without a staging buffer.
        pixels = pixels.pin_memory()
    pixels = pixels.to(model.device, non_blocking=True).to(model.vae.dtype) / 127.5 - 1.0
    with torch.no_grad():
        latents = model.vae.encode(pixels).latent_dist.mean
    shift = getattr(model.vae.config, "shift_factor", None) or 0.0
    return ((latents - shift) * model.vae.config.scaling_factor).float()


def decode_latents(model: DiffusionModel, latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) latents -> (B, H, W, 3) uint8 images on the CPU."""
    shift = getattr(model.vae.config, "shift_factor", None) or 0.0
    with torch.no_grad():
        pixels = model.vae.decode(
            latents.to(model.vae.dtype) / model.vae.config.scaling_factor + shift
        ).sample
    pixels = ((pixels.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu()
