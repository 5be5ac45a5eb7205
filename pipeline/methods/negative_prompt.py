"""Negative-prompt inversion (Miyake et al.): no optimisation, uncond := source prompt embedding.

Legend:

    c              source prompt embedding (cond_embeddings)
    null_t := c    the unconditional embedding at every step is replaced by c, so
                   eps_tilde = eps(z, t, c) + w (eps(z, t, c) - eps(z, t, c)) = eps(z, t, c) for any w:
                   sampling at any guidance retraces the w = 1 DDIM inversion path.
"""

from __future__ import annotations

from pipeline.diffusion.trajectory import InversionInputs, MethodResult, per_step
from pipeline.methods import NegativePromptParams
from pipeline.methods.ddim_inversion import ddim_trajectory


def invert(inputs: InversionInputs, params: NegativePromptParams) -> MethodResult:
    """DDIM inversion at w = 1 with the source prompt; the source prompt is also the negative prompt."""
    del params  # the method has none
    errors: list[str | None] = [None] * inputs.batch_size
    cond = inputs.cond_embeddings
    trajectory = ddim_trajectory(inputs.unet, inputs.schedule, inputs.clean_latents, cond, None, 1.0, errors)
    steps = inputs.schedule.num_steps
    return MethodResult(
        trajectory=trajectory,
        uncond_embeddings=per_step(cond, steps),
        cond_embeddings=per_step(cond, steps),
        reconstruction=None,
        errors=errors,
    )
