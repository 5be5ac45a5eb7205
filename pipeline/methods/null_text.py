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

from pipeline.diffusion.optimization import StepwiseEmbeddings, optimize_stepwise
from pipeline.diffusion.trajectory import InversionInputs, MethodResult, per_step
from pipeline.methods import NullTextParams, NullTextVAEParams
from pipeline.methods.ddim_inversion import ddim_trajectory


def learning_rate_at(base: float, step_index: int) -> float:
    """The reference notebook's schedule: lr_i = base * (1 - i / 100)."""
    return base * (1.0 - step_index / 100.0)


def stop_threshold_at(epsilon: float, step_index: int) -> float:
    """The reference notebook's early stop: step i ends once loss < epsilon + i * 2e-5."""
    return epsilon + step_index * 2e-5


def pivotal_null_text(
    inputs: InversionInputs, params: NullTextParams | NullTextVAEParams
) -> tuple[torch.Tensor, StepwiseEmbeddings]:
    """The pivotal trajectory z*_0..z*_T and the per-step null-text optimisation along it.

    Args:
        inputs: the batch (see `invert`).
        params: null-text's fields (inversion_guidance, inner_steps, learning_rate, early_stop_epsilon),
            which the null-text VAE shares.

    Returns:
        (trajectory (S+1, B, C, h, w), the optimisation's embeddings, path, iterations and errors).
    """
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
    optimized = optimize_stepwise(
        inputs.unet,
        inputs.schedule,
        trajectory,
        fixed_embeddings=inputs.cond_embeddings,
        initial_embeddings=inputs.uncond_embeddings,
        optimized_branch="uncond",
        guidance_scale=inputs.guidance_scale,
        inner_steps=params.inner_steps,
        learning_rate=lambda step_index: learning_rate_at(params.learning_rate, step_index),
        stop_threshold=lambda step_index: stop_threshold_at(params.early_stop_epsilon, step_index),
        errors=errors,
        loop="null-text optimisation",
    )
    return trajectory, optimized


def invert(inputs: InversionInputs, params: NullTextParams) -> MethodResult:
    """Pivotal DDIM inversion, then per-step null-text optimisation, all B images at once.

    Args:
        inputs: the batch; `cond_embeddings` is C, `uncond_embeddings` the initial null_T and
            `guidance_scale` the w of reconstruction and editing.
        params: inversion_guidance (w of the pivot), N, base lr and epsilon.
    """
    trajectory, optimized = pivotal_null_text(inputs, params)
    return MethodResult(
        trajectory=trajectory,
        uncond_embeddings=optimized.embeddings,
        cond_embeddings=per_step(inputs.cond_embeddings, inputs.schedule.num_steps),
        reconstruction=optimized.reconstruction,
        errors=optimized.errors,
        iterations=optimized.iterations,
    )
