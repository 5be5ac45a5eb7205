"""Prompt Tuning Inversion (Dong et al., "Prompt Tuning Inversion for Text-Driven Image Editing").

Legend (Algorithm 1; eqs. 6-10):

    z*_0..z*_T          DDIM inversion with w = 0, i.e. the unconditional branch only (lines 1-3, eq. 6)
    c*                  target prompt embedding tau_theta(P*): the initial c_T (line 6)
    c_t                 `cond_embeddings[i]`, the tuned conditional embedding of step i
    loss                || z*_{t-1} - z_{t-1}(z~_t, t, c_t) ||_2^2 with CFG w > 1 (eq. 7)
    N, beta             inner_steps, learning_rate (paper: N = 1..5, beta = 0.01..0.1)
    z~_{t-1}            z_{t-1}(z~_t, t, c_t) (eq. 8); c_{t-1} <- c_t (line 10, warm start)
    eta                 editing: c_t <- eta * c* + (1 - eta) * c_t (eq. 9); eta = 0 reconstructs,
                        eta = 1 is DDIM-Edit with the target prompt
    latent interp.      z_t^edt = eta * z_t + (1 - eta) * z*_t (eq. 10), z_t from DDIM-Edit

Optimiser: the paper's line 9 is plain gradient descent on the squared L2 norm ("sgd"); its
experiments compare against null-text at equal N and learning rate, so "adam" with MSE (null-text's
optimiser) is also offered and is the default because its step size does not depend on latent size.
"""

from __future__ import annotations

from typing import Literal

import torch

from pipeline.diffusion.ddim import DDIMSchedule
from pipeline.diffusion.optimization import optimize_stepwise
from pipeline.methods.ddim_inversion import ddim_trajectory
from pipeline.methods.result import MethodResult, per_step


def invert_prompt_tuning(
    unet: torch.nn.Module,
    schedule: DDIMSchedule,
    clean_latents: torch.Tensor,
    target_embeddings: torch.Tensor,
    uncond_embeddings: torch.Tensor,
    guidance_scale: float,
    inner_steps: int = 1,
    learning_rate: float = 0.1,
    optimizer: Literal["adam", "sgd"] = "adam",
) -> MethodResult:
    """Unconditional DDIM inversion, then per-step tuning of the conditional embedding.

    Args:
        unet: eps_theta.
        schedule: the grid.
        clean_latents: z*_0, (B, C, h, w).
        target_embeddings: c*, (B, L, D), the initial c_T.
        uncond_embeddings: (B, L, D) empty-prompt embeddings (fixed).
        guidance_scale: w > 1 of tuning, reconstruction and editing.
        inner_steps: N.
        learning_rate: beta.
        optimizer: "adam" (MSE) or "sgd" (squared L2 norm, Algorithm 1 literally).
    """
    errors: list[str | None] = [None] * clean_latents.shape[0]
    trajectory = ddim_trajectory(
        unet, schedule, clean_latents, uncond_embeddings, uncond_embeddings, 0.0, errors
    )
    tuned = optimize_stepwise(
        unet,
        schedule,
        trajectory,
        fixed_embeddings=uncond_embeddings,
        initial_embeddings=target_embeddings,
        optimized_branch="cond",
        guidance_scale=guidance_scale,
        inner_steps=inner_steps,
        learning_rate=lambda step_index: learning_rate,
        optimizer=optimizer,
        reduction="mean" if optimizer == "adam" else "sum",
        errors=errors,
    )
    return MethodResult(
        trajectory=trajectory,
        uncond_embeddings=per_step(uncond_embeddings, schedule.num_steps),
        cond_embeddings=tuned.embeddings,
        reconstruction=tuned.reconstruction,
        errors=tuned.errors,
        edit_conditioning="interpolate",
        iterations=tuned.iterations,
    )
