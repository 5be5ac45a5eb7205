"""Numeric precision of UNet calls: full fp32, TF32 matrix units, or bf16 for the fixed branches.

Legend (where each precision is allowed):

    fixed branch      a UNet call under torch.no_grad(): DDIM inversion's eps_theta(z_t, t, c), every
                      sampling step, the branch an optimisation holds fixed, and its reconstruction
                      step. No gradient flows through it.
    optimised branch  the UNet call whose output is differentiated w.r.t. an embedding (null-text,
                      prompt tuning). It runs in float32 unless the policy is bf16.

Policies:

    fp32    every matmul and convolution in IEEE float32 (TF32 off): the reference.
    tf32    float32 tensors, matmuls and convolutions on the TF32 matrix units (10-bit mantissa
            products, fp32 accumulation). Applies to the optimised branch too.
    mixed   tf32, plus the fixed branches under bf16 autocast; their outputs are cast back to
            float32 before the DDIM step, so latents and embeddings stay float32.
    bf16    mixed, plus the optimised branch under bf16 autocast (forward and backward); the
            optimised embeddings, their gradients and the optimiser state stay float32, as in
            mixed-precision training.

The policy is chosen once per model (`DiffusionModel.precision`) and made current by the engine for
the duration of an `invert` or `edit` call; the maths asks `fixed_branch_noise` for every no-grad
UNet call and `optimised_branch_noise` for every call it differentiates. The benchmark (`benchmarks/throughput.py`) and `tests/diffusion/test_precision.py` show
how far each policy's results are from fp32's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Literal

import torch

Precision = Literal["fp32", "tf32", "mixed", "bf16"]
PRECISIONS: tuple[str, ...] = ("fp32", "tf32", "mixed", "bf16")

_current: ContextVar[str] = ContextVar("inversa_precision", default="fp32")


def current() -> str:
    """The policy in force in this context ("fp32" outside any `using` block)."""
    return _current.get()


@contextlib.contextmanager
def using(precision: str) -> Iterator[None]:
    """Make `precision` current, with TF32 switched to match, restoring both on exit.

    Args:
        precision: fp32 | tf32 | mixed | bf16.

    Raises:
        ValueError: for any other name.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    allow_tf32 = precision != "fp32"
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    token = _current.set(precision)
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    torch.backends.cudnn.allow_tf32 = allow_tf32
    try:
        yield
    finally:
        _current.reset(token)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def fixed_branch_noise(
    unet: torch.nn.Module, latents: torch.Tensor, timestep: int, embeddings: torch.Tensor
) -> torch.Tensor:
    """eps_theta(z_t, t, embeddings) for a branch no gradient flows through, in float32.

    Under the mixed and bf16 policies the call runs under bf16 autocast; under mixed, a call made
    outside torch.no_grad() never does, so an optimised branch cannot be lowered by mistake.

    Args:
        unet: the noise predictor.
        latents: z_t, (N, C, h, w) float32.
        timestep: t.
        embeddings: (N, L, D) float32.

    Returns:
        (N, C, h, w) float32 noise prediction.
    """
    policy = current()
    lowered = policy == "bf16" or (policy == "mixed" and not torch.is_grad_enabled())
    return _noise(unet, latents, timestep, embeddings, lowered)


def optimised_branch_noise(
    unet: torch.nn.Module, latents: torch.Tensor, timestep: int, embeddings: torch.Tensor
) -> torch.Tensor:
    """eps_theta(z_t, t, embeddings) for the branch an optimisation differentiates, in float32.

    Lowered to bf16 autocast only under the bf16 policy; gradients reach `embeddings` in float32.

    Args:
        unet: the noise predictor.
        latents: z_t, (N, C, h, w) float32.
        timestep: t.
        embeddings: (N, L, D) float32, usually requiring grad.

    Returns:
        (N, C, h, w) float32 noise prediction.
    """
    return _noise(unet, latents, timestep, embeddings, current() == "bf16")


def _noise(
    unet: torch.nn.Module, latents: torch.Tensor, timestep: int, embeddings: torch.Tensor, lowered: bool
) -> torch.Tensor:
    with torch.autocast(latents.device.type, dtype=torch.bfloat16, enabled=lowered):
        noise = unet(latents, timestep, encoder_hidden_states=embeddings).sample
    return noise.float()
