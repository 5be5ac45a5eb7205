"""What every inversion method returns: the trajectory and the per-step embeddings to edit from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


@dataclass
class MethodResult:
    """Latent-space output of one inversion method over a batch of B images.

    Attributes:
        trajectory: (S+1, B, C, h, w); trajectory[k] is z*_k, trajectory[0] the clean latent.
        uncond_embeddings: (S, B, L, D) unconditional embedding per sampling step (sampling order).
        cond_embeddings: (S, B, L, D) conditional embedding of the reconstruction per sampling step.
        reconstruction: (B, C, h, w) z~_0 when the method computed it while optimising, else None.
        errors: per image, None or a message naming the step where it failed.
        edit_conditioning: "target": edits condition on the target prompt c*; "interpolate": on
            eta * c* + (1 - eta) * cond_embeddings[i] (prompt tuning, eq. 9).
        iterations: (S, B) optimiser steps taken per timestep and image (optimising methods).
    """

    trajectory: torch.Tensor
    uncond_embeddings: torch.Tensor
    cond_embeddings: torch.Tensor
    reconstruction: torch.Tensor | None
    errors: list[str | None]
    edit_conditioning: Literal["target", "interpolate"] = "target"
    iterations: torch.Tensor | None = None


def per_step(embeddings: torch.Tensor, num_steps: int) -> torch.Tensor:
    """(B, L, D) -> (S, B, L, D) view repeating the same embedding at every step."""
    return embeddings.unsqueeze(0).expand(num_steps, *embeddings.shape)


def nonfinite_errors(latents: torch.Tensor, step_index: int, timestep: int, errors: list[str | None]) -> None:
    """Record, per image, the first step at which its latents stopped being finite."""
    finite = torch.isfinite(latents).flatten(1).all(dim=1).tolist()
    for image, ok in enumerate(finite):
        if not ok and errors[image] is None:
            errors[image] = (
                f"image {image}: non-finite latents at inversion step {step_index} (timestep {timestep})"
            )
