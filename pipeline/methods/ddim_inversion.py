"""DDIM inversion (Song et al.; DiffusionCLIP eq. 12; Prompt Tuning Inversion eq. 6).

Legend:

    z*_0 = ENC(x_0)            clean_latents
    z*_{t+1} = sqrt(a_{t+1}) f_theta(z*_t, t) + sqrt(1 - a_{t+1}) eps_tilde(z*_t, t)      (eq. 6)
    eps_tilde                  classifier-free guided with w = `guidance_scale` during inversion:
                               w = 1 uses the source prompt only (null-text's default),
                               w = 0 the unconditional branch only (prompt tuning's Algorithm 1, line 2)
    w                          `inversion_guidance` (DDIMParams)
    t0                         return step: a schedule cut with strength < 1 stops the inversion there
"""

from __future__ import annotations

import torch

from pipeline.diffusion.ddim import DDIMSchedule
from pipeline.diffusion.sampling import predict_noise
from pipeline.diffusion.trajectory import InversionInputs, MethodResult, nonfinite_errors, per_step
from pipeline.methods import DDIMParams


def ddim_trajectory(
    unet: torch.nn.Module,
    schedule: DDIMSchedule,
    clean_latents: torch.Tensor,
    cond_embeddings: torch.Tensor,
    uncond_embeddings: torch.Tensor,
    guidance_scale: float,
    errors: list[str | None],
) -> torch.Tensor:
    """Invert z*_0 along the schedule.

    Args:
        unet: eps_theta.
        schedule: the grid; inversion visits `schedule.timesteps` from the clean end.
        clean_latents: z*_0, (B, C, h, w).
        cond_embeddings: (B, L, D) source prompt embeddings.
        uncond_embeddings: (B, L, D) unconditional embeddings.
        guidance_scale: w during inversion.
        errors: per-image error slots, filled for images whose latents become non-finite.

    Returns:
        (S+1, B, C, h, w) trajectory z*_0 .. z*_T.
    """
    latents = clean_latents
    trajectory = [latents]
    timesteps = schedule.timesteps.tolist()
    with torch.no_grad():
        for step_index in reversed(range(len(timesteps))):
            timestep = timesteps[step_index]
            noise = predict_noise(unet, latents, timestep, cond_embeddings, uncond_embeddings, guidance_scale)
            latents = schedule.inverse_step(noise, timestep, latents)
            nonfinite_errors(latents, step_index, timestep, errors, "DDIM inversion")
            trajectory.append(latents)
    return torch.stack(trajectory)


def invert(inputs: InversionInputs, params: DDIMParams) -> MethodResult:
    """Plain DDIM inversion; edits and reconstruction sample with the empty-prompt uncond embedding."""
    errors: list[str | None] = [None] * inputs.batch_size
    trajectory = ddim_trajectory(
        inputs.unet,
        inputs.schedule,
        inputs.clean_latents,
        inputs.cond_embeddings,
        inputs.uncond_embeddings,
        params.inversion_guidance,
        errors,
    )
    steps = inputs.schedule.num_steps
    return MethodResult(
        trajectory=trajectory,
        uncond_embeddings=per_step(inputs.uncond_embeddings, steps),
        cond_embeddings=per_step(inputs.cond_embeddings, steps),
        reconstruction=None,
        errors=errors,
    )
