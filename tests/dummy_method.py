"""A method kept outside the package, as a user would add one: one file that registers itself.

Legend: z*_k = scale * z_0 for every k (no noise); edits are steered onto the pivots after every step,
so an edit of this method returns scale * z_0 exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.diffusion.trajectory import EditHook, InversionInputs, MethodResult, per_step
from pipeline.methods import MethodInfo, register

NAME = "dummy_method:dummy"


@dataclass(frozen=True)
class DummyParams:
    scale: float = 1.0


class PivotHook(EditHook):
    def steer(self, latent: torch.Tensor, pivot: torch.Tensor, request) -> torch.Tensor:
        return pivot.clone()


def invert(inputs: InversionInputs, params: DummyParams) -> MethodResult:
    steps = inputs.schedule.num_steps
    trajectory = (params.scale * inputs.clean_latents).expand(steps + 1, *inputs.clean_latents.shape).clone()
    return MethodResult(
        trajectory=trajectory,
        uncond_embeddings=per_step(inputs.uncond_embeddings, steps),
        cond_embeddings=per_step(inputs.cond_embeddings, steps),
        reconstruction=None,
        errors=[None] * inputs.batch_size,
        edit_hook=PivotHook(),
    )


register(MethodInfo(NAME, DummyParams, "dummy_method", "a test method"))
