"""What every inversion method returns: the trajectory, the per-step embeddings to edit from, and how
its edits are conditioned and steered (the method's edit hook).

Legend:

    trajectory[k]          z*_k on the DDIM grid, k = 0 (clean) .. S (noise end)
    uncond_embeddings[i]   the unconditional embedding at sampling step i (null-text's null_t)
    cond_embeddings[i]     the conditional embedding at sampling step i (prompt tuning's c_t)
    value_embeddings[i]    the value input of the conditional branch's cross-attention at step i
                           (StyleDiffusion's c~_t); None = the conditional embedding itself
    EditHook               an edit row's conditional embedding (default: the target prompt c*), its
                           unconditional embedding (default: the image's uncond_embeddings), its
                           value input (default: the same c*), its latent after each step and its
                           source row's latent after each step (defaults: unchanged)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


class EditHook:
    """How a method's edit rows are conditioned and steered; this default is plain P2P editing.

    Attributes:
        stochastic: whether edits may ask for a sampled unconditional embedding (`sample_temperature`).
    """

    stochastic = False

    def edit_embeddings(
        self, reconstruction_embeddings: torch.Tensor, target_embeddings: torch.Tensor, request: Any
    ) -> torch.Tensor:
        """The edit row's conditional embedding per step.

        Args:
            reconstruction_embeddings: (S, L, D) the image's reconstruction embeddings.
            target_embeddings: (L, D) the target prompt's embedding c*.
            request: the EditRequest.

        Returns:
            (S, L, D) or a tensor broadcastable to it.
        """
        del reconstruction_embeddings, request
        return target_embeddings

    def edit_uncond_embeddings(self, reconstruction_embeddings: torch.Tensor, request: Any) -> torch.Tensor:
        """The edit row's unconditional embedding per step.

        Args:
            reconstruction_embeddings: (S, L, D) the image's unconditional embeddings (null-text's null_t).
            request: the EditRequest.

        Returns:
            (S, L, D); this default keeps the reconstruction's.
        """
        del request
        return reconstruction_embeddings

    def edit_value_embeddings(
        self, reconstruction_values: torch.Tensor, target_embeddings: torch.Tensor, request: Any
    ) -> torch.Tensor:
        """The edit row's value input per step, for methods with a separate value input.

        Args:
            reconstruction_values: (S, L, D) the image's reconstruction value input.
            target_embeddings: (L, D) the target prompt's embedding c*.
            request: the EditRequest.

        Returns:
            (S, L, D) or a tensor broadcastable to it.
        """
        del reconstruction_values, request
        return target_embeddings

    def steer(self, latent: torch.Tensor, pivot: torch.Tensor, request: Any) -> torch.Tensor:
        """The edit row's latent (C, h, w) after a step, given the inversion's pivot z*_t at that step."""
        del pivot, request
        return latent

    def steer_source(self, latent: torch.Tensor, pivot: torch.Tensor) -> torch.Tensor:
        """A source row's latent (C, h, w) after a step, given the pivot z*_t at that step."""
        del pivot
        return latent


@dataclass
class MethodResult:
    """Latent-space output of one inversion method over a batch of B images.

    Attributes:
        trajectory: (S+1, B, C, h, w); trajectory[k] is z*_k, trajectory[0] the clean latent.
        uncond_embeddings: (S, B, L, D) unconditional embedding per sampling step (sampling order).
        cond_embeddings: (S, B, L, D) conditional embedding of the reconstruction per sampling step.
        reconstruction: (B, C, h, w) z~_0 when the method computed it while optimising, else None.
        errors: per image, None or a message naming the step where it failed.
        edit_hook: how edits of this inversion are conditioned and steered.
        iterations: (S, B) optimiser steps taken per timestep and image (optimising methods).
        value_embeddings: (S, B, L, D) value input of the conditional branch's cross-attention per
            step (keys keep cond_embeddings), or None when the method feeds keys and values alike.
        kept: what else the method learned per image, each tensor batch-first (B, ...), stored with
            the inversion when a job keeps its artifacts (style_diffusion: its mapping networks).
    """

    trajectory: torch.Tensor
    uncond_embeddings: torch.Tensor
    cond_embeddings: torch.Tensor
    reconstruction: torch.Tensor | None
    errors: list[str | None]
    edit_hook: EditHook = field(default_factory=EditHook)
    iterations: torch.Tensor | None = None
    value_embeddings: torch.Tensor | None = None
    kept: dict[str, torch.Tensor] = field(default_factory=dict)


def per_step(embeddings: torch.Tensor, num_steps: int) -> torch.Tensor:
    """(B, L, D) -> (S, B, L, D) view repeating the same embedding at every step."""
    return embeddings.unsqueeze(0).expand(num_steps, *embeddings.shape)


def nonfinite_errors(
    latents: torch.Tensor, step_index: int, timestep: int, errors: list[str | None], loop: str
) -> None:
    """Record, per image, the first step at which its latents stopped being finite.

    Args:
        latents: (B, ...) latents after the step.
        step_index: the step's index in sampling order.
        timestep: the step's timestep.
        errors: per-image error slots; an image's first error is kept.
        loop: the loop the step belongs to, named in the message (e.g. "DDIM inversion").
    """
    finite = torch.isfinite(latents).flatten(1).all(dim=1).tolist()
    for image, ok in enumerate(finite):
        if not ok and errors[image] is None:
            errors[image] = (
                f"image {image}: non-finite latents in {loop} at step {step_index} (timestep {timestep})"
            )


@dataclass(frozen=True)
class InversionInputs:
    """What every inversion method receives for a batch of B images.

    Attributes:
        unet: eps_theta (weights frozen).
        schedule: the DDIM grid (a DDIMSchedule).
        clean_latents: z*_0 = ENC(x), (B, C, h, w).
        cond_embeddings: (B, L, D) embedding of the prompt the images are inverted with.
        uncond_embeddings: (B, L, D) empty-prompt embedding.
        guidance_scale: w of reconstruction and editing.
        images: (B, 3, H, W) the images in [0, 1], for methods that encode the image itself.
        image_encoder: f(images (B, 3, H, W) in [0, 1]) -> (B, N, D') image tokens (a frozen CLIP
            vision tower), for methods that need one; None when the caller gave none.
        embedding_vae: a trained dataset-wide embedding VAE (frozen) for methods that sample from one
            instead of training their own (null_text_vae with `vae`); None when the caller gave none.
    """

    unet: torch.nn.Module
    schedule: Any
    clean_latents: torch.Tensor
    cond_embeddings: torch.Tensor
    uncond_embeddings: torch.Tensor
    guidance_scale: float
    images: torch.Tensor | None = None
    image_encoder: Callable[[torch.Tensor], torch.Tensor] | None = None
    embedding_vae: torch.nn.Module | None = None

    @property
    def batch_size(self) -> int:
        return self.clean_latents.shape[0]
