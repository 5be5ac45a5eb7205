"""Semi-amortised encoding: the latent refined until the VAE's decoder draws the image.

An encoder is amortised inference: one network maps every image to its latent, and on images unlike its
training set it leaves an amortisation gap (Cremer et al., 2018, "Inference Suboptimality in Variational
Autoencoders"): a latent exists that the decoder draws better than the one the encoder gives. Refining
the encoder's latent by gradient steps on the reconstruction error closes that gap image by image
(Kim et al., 2018, "Semi-Amortized Variational Autoencoders"); exact-inversion work on latent diffusion
inverts the decoder the same way (Hong et al., 2024, "On Exact Inversion of DPM-Solvers", decoder
inversion). Every inversion method reconstructs z_0 at best, so the decoder's reach, not the encoder's,
becomes the ceiling of reconstruction and background PSNR.

Symbols:
    x           pixels            the image, in [-1, 1], (B, 3, H, W)
    D           decode            the VAE's decoder on scaled latents, (B, C, h, w) -> (B, 3, H, W)
    z_0         latents           E(x) * scaling_factor, the encoder's latent in the diffusion's units
    z*          (returned)        argmin_z ||D(z) - x||^2 / (3HW), approached by Adam from z_0
    K           steps             Adam steps
    eta         lr                Adam's step size, in scaled latent units (std about 1)

Each image's error depends on its own latent only and Adam's update is elementwise, so an image's z*
does not depend on the batch it is fitted in. The latent of the lowest error seen is kept, z_0
included: the fit never returns a latent the decoder draws worse than the encoder's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

DEFAULT_LR = 0.02


def fit_latents(
    decode: Callable[[torch.Tensor], torch.Tensor],
    pixels: torch.Tensor,
    latents: torch.Tensor,
    steps: int,
    lr: float = DEFAULT_LR,
) -> torch.Tensor:
    """z*: the latents refined by `steps` Adam steps on each image's mean squared reconstruction error.

    Args:
        decode: D, scaled latents (B, C, h, w) -> pixels (B, 3, H, W) in [-1, 1]; differentiable.
        pixels: x, float (B, 3, H, W) in [-1, 1].
        latents: z_0, float (B, C, h, w), the starting latents (the encoder's).
        steps: K >= 0; 0 returns `latents` unchanged.
        lr: eta, Adam's step size.

    Returns:
        float32 (B, C, h, w), detached: per image, the latent of the lowest error seen over the K steps
        (z_0 included).
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    best = latents.detach().float().clone()
    if steps == 0:
        return best
    target = pixels.detach().float()
    candidate = best.clone().requires_grad_(True)
    best_error = torch.full((len(best),), float("inf"), device=best.device)
    optimizer = torch.optim.Adam([candidate], lr=lr)
    with torch.enable_grad():
        for step in range(steps + 1):
            error = (decode(candidate).float() - target).pow(2).mean(dim=(1, 2, 3))
            with torch.no_grad():
                improved = error < best_error
                best[improved] = candidate[improved]
                best_error = torch.where(improved, error, best_error)
            if step == steps:
                break
            # autograd.grad, not backward: the decoder's parameters gather no gradients. Summed, so
            # each latent gets the gradient of its own image's error only.
            (candidate.grad,) = torch.autograd.grad(error.sum(), candidate)
            optimizer.step()
    return best
