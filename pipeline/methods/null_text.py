"""Null-text inversion (Mokady et al., "Null-text Inversion for Editing Real Images", §3.2-3.3).

Legend:

    z*_0..z*_T      pivotal trajectory: DDIM inversion with w = 1 and the source prompt embedding C
    null_t          `uncond_embeddings[i]`, the optimised unconditional embedding of step i
    z~_T = z*_T     the reconstruction starts on the pivot
    loss            min_{null_t} || z*_{t-1} - z_{t-1}(z~_t, null_t, C) ||^2  (MSE), CFG w = 7.5
    N               inner_steps (paper: 10), Adam with lr 1e-2 * (1 - i/100) at step i
    early stop      a step ends once loss < epsilon + i * 2e-5 (epsilon = 1e-5)
    null_{t-1}      initialised from null_t (warm start); null_T from the empty-prompt embedding
"""

from __future__ import annotations

import torch

from pipeline.diffusion.ddim import DDIMSchedule
from pipeline.diffusion.optimization import optimize_stepwise
from pipeline.methods.ddim_inversion import ddim_trajectory
from pipeline.methods.result import MethodResult, per_step


def invert_null_text(
    unet: torch.nn.Module,
    schedule: DDIMSchedule,
    clean_latents: torch.Tensor,
    cond_embeddings: torch.Tensor,
    uncond_embeddings: torch.Tensor,
    guidance_scale: float,
    inversion_guidance: float = 1.0,
    inner_steps: int = 10,
    learning_rate: float = 1e-2,
    early_stop_epsilon: float = 1e-5,
) -> MethodResult:
    """Pivotal DDIM inversion, then per-step null-text optimisation, all B images at once.

    Args:
        unet: eps_theta.
        schedule: the grid.
        clean_latents: z*_0, (B, C, h, w).
        cond_embeddings: C, (B, L, D) source prompt embeddings.
        uncond_embeddings: (B, L, D) empty-prompt embeddings, the initial null_T.
        guidance_scale: w of reconstruction and editing.
        inversion_guidance: w of the pivotal inversion (paper: 1).
        inner_steps: N.
        learning_rate: base lr, decayed linearly with the step index.
        early_stop_epsilon: epsilon of the early-stop threshold.
    """
    errors: list[str | None] = [None] * clean_latents.shape[0]
    trajectory = ddim_trajectory(
        unet, schedule, clean_latents, cond_embeddings, uncond_embeddings, inversion_guidance, errors
    )
    optimized = optimize_stepwise(
        unet,
        schedule,
        trajectory,
        fixed_embeddings=cond_embeddings,
        initial_embeddings=uncond_embeddings,
        optimized_branch="uncond",
        guidance_scale=guidance_scale,
        inner_steps=inner_steps,
        learning_rate=lambda step_index: learning_rate * (1.0 - step_index / 100.0),
        stop_threshold=lambda step_index: early_stop_epsilon + step_index * 2e-5,
        errors=errors,
    )
    return MethodResult(
        trajectory=trajectory,
        uncond_embeddings=optimized.embeddings,
        cond_embeddings=per_step(cond_embeddings, schedule.num_steps),
        reconstruction=optimized.reconstruction,
        errors=optimized.errors,
        iterations=optimized.iterations,
    )
