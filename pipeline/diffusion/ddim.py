"""Deterministic DDIM sampling and inversion steps on a fixed timestep grid.

Legend (DDIM, Song et al.; DiffusionCLIP eqs. 12-13; Prompt Tuning Inversion eqs. 4 and 6):

    alphas_cumprod[t]    alpha_bar_t, the cumulative noise schedule (diffusers' alphas_cumprod)
    final_alpha_cumprod  alpha_bar of the clean end of the chain (SD: alphas_cumprod[0], set_alpha_to_one=False)
    timesteps            tau_S > ... > tau_1: the sampling grid, in sampling order (DDIMScheduler.timesteps)
    stride               num_train_timesteps // num_steps: tau_i - tau_{i-1}
    predict_clean(...)   f_theta(z_t, t) = (z_t - sqrt(1 - alpha_bar_t) * eps) / sqrt(alpha_bar_t)
    step(...)            eq. 4:  z_{t-1} = sqrt(alpha_bar_{t-1}) f_theta(z_t, t) + sqrt(1 - alpha_bar_{t-1}) eps
    inverse_step(...)    eq. 6:  z_{t+1} = sqrt(alpha_bar_{t+1}) f_theta(z_t, t) + sqrt(1 - alpha_bar_{t+1}) eps

Trajectory indexing used throughout inversa: `latents[k]` is z*_k on the grid, `latents[0]` the clean
latent z_0 and `latents[S]` the noise end z_T. Sampling step i (0-based, i = 0..S-1) runs at
`timesteps[i]` and maps `latents[S - i]` to `latents[S - i - 1]`; inversion runs the same pairs
backwards: it maps `latents[S - i - 1]` to `latents[S - i]` with eps evaluated at `timesteps[i]`.
Inversion and sampling therefore use exactly the same (alpha_bar_t, alpha_bar_{t-1}) pairs: no
off-by-one between the two directions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler


@dataclass(frozen=True)
class DDIMSchedule:
    """A DDIM grid: sampling-order timesteps and the alpha_bar table they index.

    Attributes:
        alphas_cumprod: (num_train_timesteps,) float64 alpha_bar table.
        final_alpha_cumprod: alpha_bar used for "t < 0", the clean end of the chain.
        timesteps: (S,) long, descending sampling order.
        stride: num_train_timesteps // num_steps of the full grid.
    """

    alphas_cumprod: torch.Tensor
    final_alpha_cumprod: float
    timesteps: torch.Tensor
    stride: int

    @classmethod
    def from_scheduler(cls, scheduler: DDIMScheduler, num_steps: int, strength: float = 1.0) -> DDIMSchedule:
        """The grid of `scheduler.set_timesteps(num_steps)`, cut to its last `strength` fraction.

        Args:
            scheduler: a DDIMScheduler (SD: steps_offset=1, so 50 steps give 981, 961, ..., 1).
            num_steps: steps of the full grid.
            strength: in (0, 1]; < 1 keeps the round(strength * num_steps) lowest timesteps, i.e. the
                inversion stops at the return step t0 (DiffusionCLIP) and sampling starts from there.
        """
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if not 0.0 < strength <= 1.0:
            raise ValueError(
                f"strength must be in (0, 1], got {strength}; it is t0/T of the partial inversion"
            )
        grid = DDIMScheduler.from_config(scheduler.config)
        grid.set_timesteps(num_steps)
        kept = max(1, round(num_steps * strength))
        return cls(
            alphas_cumprod=grid.alphas_cumprod.to(torch.float64),
            final_alpha_cumprod=float(grid.final_alpha_cumprod),
            timesteps=grid.timesteps[-kept:].clone(),
            stride=grid.config.num_train_timesteps // num_steps,
        )

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.numel())

    def alpha_bar(self, timestep: int) -> float:
        return float(self.alphas_cumprod[timestep]) if timestep >= 0 else self.final_alpha_cumprod

    def step(self, noise_pred: torch.Tensor, timestep: int, latents: torch.Tensor) -> torch.Tensor:
        """DDIM sampling step (eq. 4): z_t at `timestep` -> z at `timestep - stride`.

        Args:
            noise_pred: eps_theta(z_t, t), shape (B, C, h, w).
            timestep: t, an entry of `timesteps`.
            latents: z_t, shape (B, C, h, w).
        """
        return ddim_move(
            noise_pred, latents, self.alpha_bar(timestep), self.alpha_bar(timestep - self.stride)
        )

    def inverse_step(self, noise_pred: torch.Tensor, timestep: int, latents: torch.Tensor) -> torch.Tensor:
        """DDIM inversion step (eq. 6): z at `timestep - stride` -> z_t at `timestep`.

        Args:
            noise_pred: eps_theta evaluated on `latents` at `timestep` (the usual approximation
                eps(z_{t-1}, t) ~ eps(z_t, t) that makes DDIM invertible for small steps).
            timestep: t, an entry of `timesteps`.
            latents: z at t - stride, shape (B, C, h, w).
        """
        return ddim_move(
            noise_pred, latents, self.alpha_bar(timestep - self.stride), self.alpha_bar(timestep)
        )


def ddim_move(
    noise_pred: torch.Tensor, latents: torch.Tensor, alpha_from: float, alpha_to: float
) -> torch.Tensor:
    """Deterministic DDIM move from noise level alpha_from to alpha_to, through f_theta.

    z_to = sqrt(alpha_to) f_theta + sqrt(1 - alpha_to) eps with f_theta = (z_from - sqrt(1 - alpha_from) eps)
    / sqrt(alpha_from): a sampling step (eq. 4) towards the clean end (alpha_to > alpha_from), an inversion
    step (eq. 6) towards the noise end. Differentiable in `noise_pred` and `latents`.
    """
    predicted_clean = (latents - (1.0 - alpha_from) ** 0.5 * noise_pred) / alpha_from**0.5
    return alpha_to**0.5 * predicted_clean + (1.0 - alpha_to) ** 0.5 * noise_pred
