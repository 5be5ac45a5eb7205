"""Prompt Tuning Inversion (Dong et al., "Prompt Tuning Inversion for Text-Driven Image Editing").

Legend (Algorithm 1; eqs. 6-10):

    z*_0..z*_T          DDIM inversion with w = 0, i.e. the unconditional branch only (lines 1-3, eq. 6)
    c*                  target prompt embedding tau_theta(P*): the initial c_T (line 6)
    c_t                 `cond_embeddings[i]`, the tuned conditional embedding of step i
    loss                || z*_{t-1} - z_{t-1}(z~_t, t, c_t) ||_2^2 with CFG w > 1 (eq. 7)
    N, beta             inner_steps, learning_rate (paper's defaults: N = 1, beta = 0.1; Tab. 2-3 also
                        N = 5, beta = 0.01)
    encoding ratio      the fraction of the schedule inverted (paper: 0.8; `strength`)
    z~_{t-1}            z_{t-1}(z~_t, t, c_t) (eq. 8); c_{t-1} <- c_t (line 10, warm start)
    eta                 editing: c_t <- eta * c* + (1 - eta) * c_t (eq. 9); eta = 0 reconstructs,
                        eta = 1 is DDIM-Edit with the target prompt
    latent interp.      z_t^edt = eta * z_t + (1 - eta) * z*_t (eq. 10), z_t from DDIM-Edit

Optimiser: the paper's line 9 is plain gradient descent on the squared L2 norm ("sgd", the default);
"adam" on the MSE (null-text's optimiser) is offered for comparisons at equal N and learning rate.
"""

from __future__ import annotations

import torch

from pipeline.diffusion.optimization import optimize_stepwise
from pipeline.diffusion.trajectory import EditHook, InversionInputs, MethodResult, per_step
from pipeline.methods import PromptTuningParams
from pipeline.methods.ddim_inversion import ddim_trajectory


class PromptTuningEditHook(EditHook):
    """Edits condition on eq. 9's interpolation, or steer the latent by eq. 10 (latent_interpolation)."""

    def edit_embeddings(
        self, reconstruction_embeddings: torch.Tensor, target_embeddings: torch.Tensor, request
    ) -> torch.Tensor:
        if request.latent_interpolation:
            return target_embeddings
        return request.eta * target_embeddings + (1.0 - request.eta) * reconstruction_embeddings

    def steer(self, latent: torch.Tensor, pivot: torch.Tensor, request) -> torch.Tensor:
        if not request.latent_interpolation:
            return latent
        return request.eta * latent + (1.0 - request.eta) * pivot


def edit_hook(params: PromptTuningParams, num_steps: int) -> PromptTuningEditHook:
    """The edit hook of an inversion restored from its stored state (`pipeline.inversion_state`)."""
    del params, num_steps
    return PromptTuningEditHook()


def invert(inputs: InversionInputs, params: PromptTuningParams) -> MethodResult:
    """Unconditional DDIM inversion, then per-step tuning of the conditional embedding.

    Args:
        inputs: the batch; `cond_embeddings` is c*, the initial c_T (the paper takes the target
            prompt's), `uncond_embeddings` the fixed empty-prompt embedding, `guidance_scale` w > 1.
        params: N, beta and the optimiser.
    """
    errors: list[str | None] = [None] * inputs.batch_size
    uncond = inputs.uncond_embeddings
    trajectory = ddim_trajectory(
        inputs.unet, inputs.schedule, inputs.clean_latents, uncond, uncond, 0.0, errors
    )
    tuned = optimize_stepwise(
        inputs.unet,
        inputs.schedule,
        trajectory,
        fixed_embeddings=uncond,
        initial_embeddings=inputs.cond_embeddings,
        optimized_branch="cond",
        guidance_scale=inputs.guidance_scale,
        inner_steps=params.inner_steps,
        learning_rate=lambda step_index: params.learning_rate,
        optimizer=params.optimizer,
        reduction="mean" if params.optimizer == "adam" else "sum",
        errors=errors,
        loop="prompt tuning optimisation",
    )
    return MethodResult(
        trajectory=trajectory,
        uncond_embeddings=per_step(uncond, inputs.schedule.num_steps),
        cond_embeddings=tuned.embeddings,
        reconstruction=tuned.reconstruction,
        errors=tuned.errors,
        edit_hook=edit_hook(params, inputs.schedule.num_steps),
        iterations=tuned.iterations,
    )
