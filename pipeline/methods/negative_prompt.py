"""Negative-prompt inversion (Miyake et al.): no optimisation, uncond := source prompt embedding.

Legend:

    c              source prompt embedding (cond_embeddings)
    null_t := c    the unconditional embedding at every step is replaced by c, so
                   eps_tilde = eps(z, t, c) + w (eps(z, t, c) - eps(z, t, c)) = eps(z, t, c) for any w:
                   sampling at any guidance retraces the w = 1 DDIM inversion path.
"""

from __future__ import annotations

import torch

from pipeline.diffusion.ddim import DDIMSchedule
from pipeline.methods.ddim_inversion import ddim_trajectory
from pipeline.methods.result import MethodResult, per_step


def invert_negative_prompt(
    unet: torch.nn.Module,
    schedule: DDIMSchedule,
    clean_latents: torch.Tensor,
    cond_embeddings: torch.Tensor,
) -> MethodResult:
    """DDIM inversion at w = 1 with the source prompt; the source prompt is also the negative prompt."""
    errors: list[str | None] = [None] * clean_latents.shape[0]
    trajectory = ddim_trajectory(unet, schedule, clean_latents, cond_embeddings, None, 1.0, errors)
    steps = schedule.num_steps
    return MethodResult(
        trajectory=trajectory,
        uncond_embeddings=per_step(cond_embeddings, steps),
        cond_embeddings=per_step(cond_embeddings, steps),
        reconstruction=None,
        errors=errors,
    )
