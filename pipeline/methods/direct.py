"""Direct inversion (Ju et al., "PnP Inversion: Boosting Diffusion-based Editing with 3 Lines of Code",
ICLR 2024, Algorithm 1; the reference code cure-lab/PnPInversion `DirectInversion`).

No optimisation: DDIM-invert once, then, while editing, put the source branch back on the inversion
path after every step and leave the target branch alone.

Legend:

    z*_0 .. z*_T           trajectory: DDIM inversion of z*_0 = ENC(x) with w = `inversion_guidance`
    z^src_{t-1}            the source row's latent after a guided sampling step from z^src_t
    d_{t-1}                z*_{t-1} - z^src_{t-1}, the reference code's `noise_loss`: added to the source
                           branch only, so z^src_{t-1} + d_{t-1} = z*_{t-1} at every step
    z^tgt_{t-1}            the edit rows' latents: never corrected; they follow the source branch only
                           through Prompt-to-Prompt's attention injection (and local blend)
    reconstruction         the source branch ends at z*_0 exactly, so the reconstruction is ENC(x)
"""

from __future__ import annotations

import dataclasses

import torch

from pipeline.diffusion.trajectory import EditHook, InversionInputs, MethodResult
from pipeline.methods import DDIMParams, DirectParams, ddim_inversion


class DirectInversionEditHook(EditHook):
    """Adds d_{t-1} to the source rows after every step; edit rows keep plain P2P conditioning."""

    def steer_source(self, latent: torch.Tensor, pivot: torch.Tensor) -> torch.Tensor:
        offset = pivot - latent  # d_{t-1}
        return latent + offset


def edit_hook(params: DirectParams, num_steps: int) -> DirectInversionEditHook:
    """The edit hook of an inversion restored from its stored state (`pipeline.inversion_state`)."""
    del params, num_steps
    return DirectInversionEditHook()


def invert(inputs: InversionInputs, params: DirectParams) -> MethodResult:
    """DDIM inversion; the source branch of every edit is then held on its trajectory."""
    result = ddim_inversion.invert(inputs, DDIMParams(inversion_guidance=params.inversion_guidance))
    # The corrected source branch ends on z*_0 by construction: no sampling pass is needed for it.
    return dataclasses.replace(
        result,
        reconstruction=result.trajectory[0].clone(),
        edit_hook=edit_hook(params, inputs.schedule.num_steps),
    )
