"""Per-timestep embedding optimisation along a DDIM trajectory, batched over images.

Shared by null-text inversion (optimises the unconditional branch) and prompt tuning inversion
(optimises the conditional branch). Legend:

    z*_{t-1}                    trajectory[S - i - 1], the pivot the guided step must land on
    z~_t                        `latents`, the current reconstruction (starts at z*_T)
    z_{t-1}(z~_t, t, e)         one guided DDIM step with the optimised embedding e
    loss_b                      ||z*_{t-1} - z_{t-1}(z~_t, t, e_b)||^2 of image b (mean or sum)

Batching: image b has its own leaf tensor e_b and its own optimiser state (torch.optim keeps state per
parameter), and an image whose early-stop test passed gets no gradient, which torch.optim skips.
The summed loss gives each e_b exactly the gradient of its own loss, because the UNet treats batch
rows independently. So B images optimised together equal B separate runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from pipeline.diffusion.ddim import DDIMSchedule
from pipeline.diffusion.precision import fixed_branch_noise, optimised_branch_noise
from pipeline.diffusion.trajectory import nonfinite_errors


@dataclass
class StepwiseEmbeddings:
    """Result of `optimize_stepwise`.

    Attributes:
        embeddings: (S, B, L, D) optimised embedding per sampling step.
        reconstruction: (B, C, h, w) z~_0 reached with those embeddings.
        iterations: (S, B) optimiser steps taken per timestep and image.
        errors: per image, None or where it failed.
        path: (S, B, C, h, w) z~_t, the reconstruction's latent at the start of each sampling step.
    """

    embeddings: torch.Tensor
    reconstruction: torch.Tensor
    iterations: torch.Tensor
    errors: list[str | None]
    path: torch.Tensor | None = None


def optimize_stepwise(
    unet: torch.nn.Module,
    schedule: DDIMSchedule,
    trajectory: torch.Tensor,
    fixed_embeddings: torch.Tensor,
    initial_embeddings: torch.Tensor,
    optimized_branch: Literal["uncond", "cond"],
    guidance_scale: float,
    inner_steps: int,
    learning_rate: Callable[[int], float],
    optimizer: Literal["adam", "sgd"] = "adam",
    reduction: Literal["mean", "sum"] = "mean",
    stop_threshold: Callable[[int], float] | None = None,
    errors: list[str | None] | None = None,
    loop: str = "embedding optimisation",
) -> StepwiseEmbeddings:
    """Optimise one branch's embedding at every timestep so the guided step lands on the trajectory.

    Args:
        unet: eps_theta (weights frozen).
        schedule: the grid the trajectory was inverted on.
        trajectory: (S+1, B, C, h, w) pivots z*_0..z*_T.
        fixed_embeddings: (B, L, D) embedding of the branch that is not optimised.
        initial_embeddings: (B, L, D) start of the optimised branch; each step warm-starts from the
            previous step's result.
        optimized_branch: "uncond" (null-text) or "cond" (prompt tuning).
        guidance_scale: w of the guided step.
        inner_steps: N iterations per timestep.
        learning_rate: lr as a function of the step index i.
        optimizer: "adam" or "sgd" (plain gradient descent, e <- e - lr * grad).
        reduction: loss over latent elements: "mean" (MSE) or "sum" (squared L2 norm).
        stop_threshold: early stop: an image stops at step i once its loss < stop_threshold(i).
        errors: per-image error slots (images already failed are skipped).
        loop: the loop's name in error messages (e.g. "null-text optimisation").

    Returns:
        StepwiseEmbeddings.
    """
    steps, batch = schedule.num_steps, trajectory.shape[1]
    errors = list(errors) if errors is not None else [None] * batch
    current = initial_embeddings.detach().clone()
    latents = trajectory[steps]
    per_step, path, iterations = [], [], torch.zeros(steps, batch, dtype=torch.long)
    optimizer_class = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[optimizer]
    for step_index, timestep in enumerate(schedule.timesteps.tolist()):
        target = trajectory[steps - step_index - 1]
        path.append(latents)
        params = [current[image].clone().requires_grad_(True) for image in range(batch)]
        step_optimizer = optimizer_class(params, lr=learning_rate(step_index))
        with torch.no_grad():
            fixed_noise = fixed_branch_noise(unet, latents, timestep, fixed_embeddings)
        active = [image for image in range(batch) if errors[image] is None]
        for _ in range(inner_steps):
            if not active:
                break
            index = torch.tensor(active, device=latents.device)
            optimized_noise = optimised_branch_noise(
                unet, latents[index], timestep, torch.stack([params[i] for i in active])
            )
            noise = _guided(optimized_noise, fixed_noise[index], optimized_branch, guidance_scale)
            landed = schedule.step(noise, timestep, latents[index])
            squared = (landed - target[index]).pow(2).flatten(1)
            losses = squared.mean(dim=1) if reduction == "mean" else squared.sum(dim=1)
            step_optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()
            step_optimizer.step()
            iterations[step_index, index.cpu()] += 1
            active = _still_active(
                active, losses.detach().tolist(), step_index, timestep, stop_threshold, errors, loop
            )
        current = torch.stack(params).detach()
        per_step.append(current)
        with torch.no_grad():
            # The fixed branch's prediction does not depend on the optimised embedding: reuse it and
            # run the UNet only for the optimised branch (one batch-B call instead of a 2B one).
            optimized_noise = fixed_branch_noise(unet, latents, timestep, current)
            noise = _guided(optimized_noise, fixed_noise, optimized_branch, guidance_scale)
            latents = schedule.step(noise, timestep, latents)
        nonfinite_errors(latents, step_index, timestep, errors, f"{loop} (reconstruction step)")
    return StepwiseEmbeddings(torch.stack(per_step), latents, iterations, errors, torch.stack(path))


def _guided(
    optimized_noise: torch.Tensor,
    fixed_noise: torch.Tensor,
    optimized_branch: Literal["uncond", "cond"],
    guidance_scale: float,
) -> torch.Tensor:
    """eps_tilde = eps_uncond + w * (eps_cond - eps_uncond), from the two branches' (N, C, h, w) noises."""
    if optimized_branch == "uncond":
        noise_uncond, noise_cond = optimized_noise, fixed_noise
    else:
        noise_uncond, noise_cond = fixed_noise, optimized_noise
    return noise_uncond + guidance_scale * (noise_cond - noise_uncond)


def _still_active(
    active: list[int],
    losses: list[float],
    step_index: int,
    timestep: int,
    stop_threshold: Callable[[int], float] | None,
    errors: list[str | None],
    loop: str,
) -> list[int]:
    still = []
    for image, loss in zip(active, losses, strict=True):
        if loss != loss or loss in (float("inf"), float("-inf")):
            errors[image] = (
                f"image {image}: non-finite loss in {loop} at step {step_index} (timestep {timestep})"
            )
        elif stop_threshold is None or loss >= stop_threshold(step_index):
            still.append(image)
    return still
