"""Classifier-free-guided noise prediction and DDIM sampling with per-step, per-row embeddings.

Legend (classifier-free guidance, Ho & Salimans; Prompt Tuning Inversion eq. 5):

    eps_tilde = eps_theta(z_t, t, uncond) + w * (eps_theta(z_t, t, c) - eps_theta(z_t, t, uncond))

    uncond_embeddings[i]   the unconditional embedding at sampling step i (null-text optimises it)
    cond_embeddings[i]     the conditional embedding at step i (prompt tuning optimises it)
    w                      guidance scale; w = 1 needs only the conditional branch, w = 0 only the
                           unconditional one
    value_embeddings[i]    StyleDiffusion's c~_t: the value input of the conditional branch's
                           cross-attention at step i (keys keep cond_embeddings); None = ordinary
                           attention. The UNet must carry value-input processors (`use_attention_controller`
                           with value_input=True) while they are used.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pipeline.diffusion.attention import AttentionController, use_attention_controller
from pipeline.diffusion.ddim import DDIMSchedule
from pipeline.diffusion.precision import fixed_branch_noise


def predict_noise(
    unet: torch.nn.Module,
    latents: torch.Tensor,
    timestep: int,
    cond_embeddings: torch.Tensor,
    uncond_embeddings: torch.Tensor | None,
    guidance_scale: float,
    force_both_branches: bool = False,
    value_embeddings: torch.Tensor | None = None,
) -> torch.Tensor:
    """eps_tilde for a batch, both guidance branches in one UNet call (a fixed branch: no gradient).

    Args:
        unet: the noise predictor.
        latents: z_t, (N, C, h, w).
        timestep: t.
        cond_embeddings: (N, L, D).
        uncond_embeddings: (N, L, D), or None when guidance_scale == 1.
        guidance_scale: w.
        force_both_branches: run both branches even at w = 0 or 1 (attention control needs them).
        value_embeddings: (N, L, D) value input of the conditional branch, or None. When given, both
            branches pass `[key input | value input]` (the unconditional one its own embedding twice).

    Returns:
        (N, C, h, w) guided noise prediction.
    """
    if value_embeddings is not None:
        cond_embeddings = torch.cat([cond_embeddings, value_embeddings], dim=1)
        if uncond_embeddings is not None:
            uncond_embeddings = torch.cat([uncond_embeddings, uncond_embeddings], dim=1)
    if not force_both_branches and guidance_scale == 1.0:
        return fixed_branch_noise(unet, latents, timestep, cond_embeddings)
    if uncond_embeddings is None:
        raise ValueError(f"guidance_scale={guidance_scale} needs unconditional embeddings")
    if not force_both_branches and guidance_scale == 0.0:
        return fixed_branch_noise(unet, latents, timestep, uncond_embeddings)
    noise = fixed_branch_noise(
        unet, torch.cat([latents, latents]), timestep, torch.cat([uncond_embeddings, cond_embeddings])
    )
    noise_uncond, noise_cond = noise.chunk(2)
    return noise_uncond + guidance_scale * (noise_cond - noise_uncond)


StepCallback = Callable[[int, torch.Tensor], torch.Tensor]


def sample(
    unet: torch.nn.Module,
    schedule: DDIMSchedule,
    start_latents: torch.Tensor,
    cond_embeddings: torch.Tensor,
    uncond_embeddings: torch.Tensor,
    guidance_scale: float,
    controller: AttentionController | None = None,
    after_step: StepCallback | None = None,
    value_embeddings: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic DDIM sampling from `start_latents` over `schedule.timesteps`.

    Args:
        unet: the noise predictor (with a controller's processors installed, if any).
        schedule: the grid; sampling runs all its steps.
        start_latents: z_T (or z_t0 for partial inversion), (N, C, h, w).
        cond_embeddings: (S, N, L, D) per-step conditional embeddings (expand() views are fine).
        uncond_embeddings: (S, N, L, D) per-step unconditional embeddings.
        guidance_scale: w.
        controller: attention controller whose `step` is advanced here.
        after_step: f(i, latents) -> latents applied after step i (local blend, latent interpolation).
        value_embeddings: (S, N, L, D) per-step value input of the conditional branch, or None.

    Returns:
        latents: z_0, (N, C, h, w).
        first_nonfinite_step: (N,) long, the first step whose latents were not finite, -1 if none.
    """
    latents = start_latents
    first_nonfinite = torch.full((latents.shape[0],), -1, dtype=torch.long)
    processors = use_attention_controller(unet, controller, value_input=value_embeddings is not None)
    with torch.no_grad(), processors:
        for step_index, timestep in enumerate(schedule.timesteps.tolist()):
            if controller is not None:
                controller.step = step_index
            noise = predict_noise(
                unet,
                latents,
                timestep,
                cond_embeddings[step_index],
                uncond_embeddings[step_index],
                guidance_scale,
                force_both_branches=controller is not None,
                value_embeddings=None if value_embeddings is None else value_embeddings[step_index],
            )
            latents = schedule.step(noise, timestep, latents)
            if after_step is not None:
                latents = after_step(step_index, latents)
            bad = ~torch.isfinite(latents).flatten(1).all(dim=1).cpu()
            first_nonfinite[bad & (first_nonfinite < 0)] = step_index
    return latents, first_nonfinite
