"""ZIP, the zero-shot inversion process (papers/000): a frozen diffusion model edited through its h-space
by a small attribute encoder that reads a reference image of the attribute.

Pure torch: no Ray, no files. Training (`pipeline.training.zip_encoder`) and editing (`pipeline.editors`)
call these functions.

Legend (papers/000; latent diffusion, so x is the VAE latent and images come from DEC(x)):

    h_t                   the UNet's h-space: the output of its mid block at x_t, (B, C, h', w')
                          (Asyrp's semantic latent space; for SD 1.5 at 512 px, (B, 1280, 8, 8))
    i_ref                 the reference image of the attribute, rendered from the target prompt by the
                          same model (Algorithm 1 line 2, the "Visual Generator") or given by the user
    E_A(i_ref)            the attribute encoder. Fig. 2 shares its parameters with the Editing Generator
                          and trains only its last layers (§5: "only the last five layers"): here the
                          frozen UNet's encoder path reads the reference's clean latent (t = 0) into
                          h_ref, pooled over space to the reference code r = mean_xy h_ref, (C,), once
                          (Algorithm 1 line 3); `AttributeHead` is the five trained layers
    Δh                    = AttributeHead(h_t, r): the trained layers see the image's own h_t beside the
                          reference code, so the attribute lands where the image's object is (the paper's
                          faces are aligned; scenes of a dataset are not). The last layer starts at zero,
                          so an untrained encoder leaves the model's output unchanged
    r^                    optional (not in the paper): r standardised over the training references,
                          (r - mean_R r) / rms_R(r - mean_R r), one scale for all channels. References of
                          one kind share most of r (for the shapes world's stars in six colours, norms
                          near 16 and colour differences near 2), which the trained layers would otherwise
                          read as a constant; the mean and scale travel with the head
    eps~_theta(x_t, t)    the noise predicted with h_t + Δh in place of h_t (the mid block's output)
    P_t(eps)              the predicted x_0 of eq. 4: (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)
    D_t(eps)              the direction to x_t of eq. 4: sqrt(1 - a_{t-1} - sigma_t^2) eps (+ sigma_t eps_t);
                          inversa uses eta = 0 (sigma_t = 0), the deterministic process the inversion
                          needs
    asymmetric step       eq. 5: x_{t-1} = sqrt(a_{t-1}) P_t(eps~) + D_t(eps): Δh enters only the
                          predicted x_0, since changing eps in both terms cancels out (Asyrp, Theorem 1)
    t_zip                 Algorithm 1 lines 7-10: the asymmetric step for t > t_zip, the ordinary DDIM
                          step below it "to improve editing quality" (Fig. 4: Δh between t = 600 and 300)
    t0                    the return step: the editing image is inverted to x_t0 by deterministic DDIM
                          (Fig. 3b) and generated back from there (Fig. 4 starts at t = 600)
    L (eq. 6)             lambda_clip L_direction(DEC(P_t(eps~)), t_target; DEC(P_t(eps)), t_source)
                          + lambda_recon |DEC(P_t(eps~)) - DEC(P_t(eps))|_1 at each t > t_zip; the CLIP
                          direction loss is eq. 3 (`pipeline.methods.diffusion_clip.direction_loss`)
    per_step              `training_losses`: eq. 6 at every t > t_zip on that step's predicted x_0, the
                          pass continuing detached (one UNet call in memory)
    full_backprop         `full_pass_loss`: Algorithm 1 read literally (lines 6-12: generate i_out = x_0,
                          then update E_A): eq. 6 once, on the final images of the pass with Δh against
                          the same pass without it, differentiated through every generative step
    L_prior               optional (not in the paper), full_backprop only: DiffusionCLIP's prior on the
                          final latent of the pass with Δh, by the frozen model itself (score distillation
                          or Delta Denoising Score; `pipeline.methods.diffusion_clip.prior_loss`)
    L_teacher             optional (not in the paper), full_backprop only: lambda_teacher times the mean
                          squared error between DEC(x_0) of the pass with Δh and a teacher's edit of the
                          same image, in [-1, 1] (`TeacherTerm`; the training task renders the frozen
                          model's own text-guided edits, so no weight of the model changes)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.diffusion.ddim import ddim_move
from pipeline.methods.diffusion_clip import PriorTerm, ReturnGrid, direction_loss, predict_clean, prior_loss

# eps_theta(x_t, t) -> (B, C, h, w); the caller binds the UNet and the conditioning.
NoiseFn = Callable[[torch.Tensor, int], torch.Tensor]
# x_t -> (eps_theta(x_t, t), eps~_theta(x_t, t)), each (B, C, h, w): both from one UNet call (`paired_noise`).
PairedNoiseFn = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
# latents (B, C, h, w) -> images (B, 3, H, W) in [-1, 1], differentiable.
DecodeFn = Callable[[torch.Tensor], torch.Tensor]
# images (B, 3, H, W) in [0, 1] -> unit-norm CLIP image embeddings (B, D), differentiable.
EmbedFn = Callable[[torch.Tensor], torch.Tensor]

HEAD_LAYERS = 5


class AttributeHead(nn.Module):
    """The trained last layers of E_A: (h_t, reference code r) -> Δh.

    Five convolutions: a 1x1 projection of [h_t ; r broadcast over space] (2C channels) to `hidden`,
    three 3x3 convolutions, and a 1x1 projection back to C whose weights start at zero.

    Args:
        channels: C, the mid block's output channels.
        hidden: width of the inner layers (default min(C, 256)).
    """

    def __init__(self, channels: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or min(channels, 256)
        self.channels, self.hidden = channels, hidden
        layers: list[nn.Module] = [nn.Conv2d(2 * channels, hidden, 1)]
        for _ in range(HEAD_LAYERS - 2):
            layers += [nn.SiLU(), nn.Conv2d(hidden, hidden, 3, padding=1)]
        layers += [nn.SiLU(), nn.Conv2d(hidden, channels, 1)]
        self.layers = nn.Sequential(*layers)
        nn.init.zeros_(self.layers[-1].weight)
        nn.init.zeros_(self.layers[-1].bias)
        self.register_buffer("code_mean", torch.zeros(channels))
        self.register_buffer("code_scale", torch.ones(()))

    def standardise_codes(self, codes: torch.Tensor) -> None:
        """Read every later r as r^ (see the legend), with the mean and scale of these codes.

        Args:
            codes: the training references' r, (R, C).

        Raises:
            ValueError: if the codes do not differ (one reference, or references alike).
        """
        mean = codes.mean(dim=0)
        scale = (codes - mean).pow(2).mean().sqrt()
        if not float(scale) > 1e-6:
            raise ValueError(
                f"reference codes of {len(codes)} references do not differ: nothing to standardise "
                "(give references that vary, or reference_norm: none)"
            )
        self.code_mean.copy_(mean)
        self.code_scale.copy_(scale)

    def forward(self, features: torch.Tensor, reference_code: torch.Tensor) -> torch.Tensor:
        """Δh for a batch.

        Args:
            features: h_t, (B, C, h', w').
            reference_code: r, (C,) for every row or (B, C) one per row.

        Returns:
            Δh, (B, C, h', w').
        """
        reference_code = (reference_code - self.code_mean) / self.code_scale  # identity unless standardised
        code = reference_code.expand(features.shape[0], -1) if reference_code.dim() == 1 else reference_code
        code = code.to(features.dtype)[:, :, None, None].expand_as(features)
        return self.layers(torch.cat([features, code], dim=1))


@contextlib.contextmanager
def captured_mid_features(unet: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Record h (the mid block's output) of every UNet call made inside the block.

    Yields:
        The list the outputs are appended to, (B, C, h', w') each.
    """
    captured: list[torch.Tensor] = []
    handle = unet.mid_block.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        yield captured
    finally:
        handle.remove()


@contextlib.contextmanager
def shifted_h_space(unet: nn.Module, delta: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Inside the block every UNet call continues from h + delta(h) in place of its mid block's output h.

    A forward hook on `unet.mid_block` (torch's module-hook API: the UNet's own forward is unchanged).

    Args:
        unet: a diffusers UNet2DConditionModel (any UNet with a `mid_block`).
        delta: h (B, C, h', w') -> Δh of the same shape.
    """
    handle = unet.mid_block.register_forward_hook(lambda module, args, output: output + delta(output))
    try:
        yield
    finally:
        handle.remove()


def paired_noise(
    noise_fn: NoiseFn, unet: nn.Module, delta: Callable[[torch.Tensor], torch.Tensor]
) -> PairedNoiseFn:
    """eps and eps~ of a batch from one UNet call on [x_t ; x_t], Δh added to the second half's h only.

    One call computes both branches with the same kernels, so where Δh = 0 the two are the same
    numbers (an untrained encoder's ΔI is exactly zero, not rounding noise that L_direction would
    read as a direction), and the model runs once per step, not twice.

    Args:
        noise_fn: eps_theta bound to `unet` and the conditioning; it must accept a batch of 2B.
        unet: the UNet `noise_fn` calls (the hook goes on its mid block).
        delta: h of the B edited rows (B, C, h', w') -> Δh.
    """

    def paired(latents: torch.Tensor, timestep: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch = latents.shape[0]

        def shift(features: torch.Tensor) -> torch.Tensor:
            return torch.cat([torch.zeros_like(features[:batch]), delta(features[batch:])])

        with shifted_h_space(unet, shift):
            noise = noise_fn(torch.cat([latents, latents]), timestep)
        return noise[:batch], noise[batch:]

    return paired


def reference_codes(mid_features: torch.Tensor) -> torch.Tensor:
    """r = mean over space of h_ref: (R, C, h', w') -> (R, C)."""
    return mid_features.mean(dim=(2, 3))


def asymmetric_step(
    edited_noise: torch.Tensor, noise: torch.Tensor, latents: torch.Tensor, alpha: float, alpha_prev: float
) -> torch.Tensor:
    """Eq. 5 with eta = 0: x_{t-1} = sqrt(a_{t-1}) P_t(eps~) + sqrt(1 - a_{t-1}) eps.

    Args:
        edited_noise: eps~_theta(x_t, t) (with Δh), (B, C, h, w).
        noise: eps_theta(x_t, t), (B, C, h, w).
        latents: x_t.
        alpha: a_t (alpha_bar of the current level).
        alpha_prev: a_{t-1} (alpha_bar of the next level towards the clean end).

    Returns:
        x_{t-1}. With edited_noise == noise it is the ordinary DDIM step (`ddim_move`).
    """
    return alpha_prev**0.5 * predict_clean(edited_noise, latents, alpha) + (1.0 - alpha_prev) ** 0.5 * noise


def generate(
    noise_fn: NoiseFn,
    paired_noise_fn: PairedNoiseFn,
    grid: ReturnGrid,
    start_latents: torch.Tensor,
    zip_step: int,
) -> torch.Tensor:
    """Algorithm 1 lines 6-11: from x_t0 to x_0, the asymmetric step above t_zip, DDIM below.

    Args:
        noise_fn: eps_theta (the levels at or below t_zip).
        paired_noise_fn: (eps_theta, eps~_theta) (the levels above t_zip).
        grid: the generative grid (S_gen levels up to t0).
        start_latents: x_t0, (B, C, h, w).
        zip_step: t_zip; levels whose timestep is > t_zip take the asymmetric step.

    Returns:
        x_0, (B, C, h, w).
    """
    latents = start_latents
    for level in range(grid.num_steps, 0, -1):
        timestep = int(grid.timesteps[level])
        alpha, alpha_prev = grid.alpha(level), grid.alpha(level - 1)
        if timestep > zip_step:
            noise, edited_noise = paired_noise_fn(latents, timestep)
            latents = asymmetric_step(edited_noise, noise, latents, alpha, alpha_prev)
        else:
            latents = ddim_move(noise_fn(latents, timestep), latents, alpha, alpha_prev)
    return latents


@dataclass(frozen=True)
class LossWeights:
    """The weights of eq. 6.

    Attributes:
        clip: lambda_clip, the weight of L_direction.
        recon: lambda_recon, the weight of the L1 term.
    """

    clip: float = 1.0
    recon: float = 0.3


def zip_loss(
    edited_images: torch.Tensor,
    images: torch.Tensor,
    embed: EmbedFn,
    text_direction: torch.Tensor,
    weights: LossWeights,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. 6 at one timestep, mean over the batch.

    Args:
        edited_images: DEC(P_t(eps~)), (B, 3, H, W) in [-1, 1], differentiable.
        images: DEC(P_t(eps)), (B, 3, H, W) in [-1, 1] (no gradient needed).
        embed: the CLIP image encoder (images in [0, 1] -> unit-norm embeddings).
        text_direction: ΔT = E_T(t_target) - E_T(t_source), (B, D) or (D,); with an ensemble of K CLIPs
            (`diffusion_clip.ensemble_embed`, whose rows are member-major), (K * B, D).
        weights: lambda_clip and lambda_recon.

    Returns:
        The scalar loss and its detached terms {"direction", "l1"}.
    """
    # One call for both, as for the noise: equal images give exactly equal embeddings.
    both = embed(((torch.cat([edited_images, images.detach()]) + 1.0) / 2.0).clamp(0.0, 1.0))
    # (K * 2B, D) -> each member's edited rows, then their unedited rows: (K * B, D) each.
    halves = both.unflatten(0, (-1, 2, edited_images.shape[0]))
    edited_embeddings, embeddings = halves[:, 0].flatten(0, 1), halves[:, 1].flatten(0, 1)
    direction = direction_loss(edited_embeddings, embeddings, text_direction).mean()
    l1 = F.l1_loss(edited_images, images)
    loss = weights.clip * direction + weights.recon * l1
    return loss, {"direction": direction.detach(), "l1": l1.detach()}


def training_losses(
    paired_noise_fn: PairedNoiseFn,
    grid: ReturnGrid,
    start_latents: torch.Tensor,
    zip_step: int,
    decode: DecodeFn,
    embed: EmbedFn,
    text_direction: torch.Tensor,
    weights: LossWeights,
) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """The losses of eq. 6 along one generative pass (Algorithm 1 lines 6-12), one per level above t_zip.

    At each level with t > t_zip the loss compares DEC(P_t(eps~)) with DEC(P_t(eps)); the pass then
    continues by the asymmetric step, detached, so each loss reaches E_A through one UNet call and the
    caller may backpropagate it before the next (gradients accumulate; one optimiser step per pass, as
    Algorithm 1 updates E_A once per pass). Levels at or below t_zip have no Δh and no loss.

    Args:
        paired_noise_fn: (eps_theta, eps~_theta), the second differentiable in E_A's parameters.
        grid: the generative grid.
        start_latents: x_t0, (B, C, h, w).
        zip_step: t_zip.
        decode: DEC.
        embed: the CLIP image encoder.
        text_direction: ΔT, (B, D) or (D,).
        weights: lambda_clip and lambda_recon.

    Yields:
        (loss, terms) of each level above t_zip, from t0 down.
    """
    latents = start_latents.detach()
    for level in range(grid.num_steps, 0, -1):
        timestep = int(grid.timesteps[level])
        if timestep <= zip_step:
            return
        alpha, alpha_prev = grid.alpha(level), grid.alpha(level - 1)
        noise, edited_noise = paired_noise_fn(latents, timestep)
        noise = noise.detach()
        both = decode(predict_clean(torch.cat([edited_noise, noise]), torch.cat([latents, latents]), alpha))
        edited_images, images = both.chunk(2)
        next_latents = asymmetric_step(edited_noise.detach(), noise, latents, alpha, alpha_prev)
        yield zip_loss(edited_images, images, embed, text_direction, weights)
        latents = next_latents


@dataclass(frozen=True)
class TeacherTerm:
    """L_teacher of one batch (not in the paper).

    Attributes:
        images: the teacher's edits of the batch's images, (B, 3, H, W) in [-1, 1].
        weight: lambda_teacher.
    """

    images: torch.Tensor
    weight: float


def full_pass_loss(
    paired_noise_fn: PairedNoiseFn,
    noise_fn: NoiseFn,
    grid: ReturnGrid,
    start_latents: torch.Tensor,
    zip_step: int,
    decode: DecodeFn,
    embed: EmbedFn,
    text_direction: torch.Tensor,
    weights: LossWeights,
    prior: PriorTerm | None = None,
    teacher: TeacherTerm | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. 6 on the final images of one generative pass (Algorithm 1 lines 6-12), differentiable.

    The pass without Δh (the image's own reconstruction, i_edit's P) and the pass with it (i_out) run
    side by side in the same UNet calls, so where Δh = 0 they are the same numbers.

    Args:
        paired_noise_fn: (eps_theta, eps~_theta) of a batch, differentiable in E_A's parameters.
        noise_fn: eps_theta, differentiable in its latents (the steps at or below t_zip).
        grid: the generative grid.
        start_latents: x_t0, (B, C, h, w).
        zip_step: t_zip.
        decode: DEC.
        embed: the CLIP image encoder.
        text_direction: ΔT, (B, D) or (D,).
        weights: lambda_clip and lambda_recon.
        prior: L_prior's draw on the latents with Δh, or None (the paper's loss).
        teacher: L_teacher's edits of the batch, or None (the paper's loss).

    Returns:
        The scalar loss and its detached terms {"direction", "l1"}, and "teacher" (its unweighted mean
        squared error) with a teacher.
    """
    batch = start_latents.shape[0]
    latents = torch.cat([start_latents, start_latents]).detach()  # [without Δh ; with Δh]
    for level in range(grid.num_steps, 0, -1):
        timestep = int(grid.timesteps[level])
        alpha, alpha_prev = grid.alpha(level), grid.alpha(level - 1)
        if timestep > zip_step:
            noise, edited_noise = paired_noise_fn(latents, timestep)
            # eps~ only for the rows with Δh; the rows without it keep eps in both terms (eq. 4).
            edited_noise = torch.cat([noise[:batch], edited_noise[batch:]])
            latents = asymmetric_step(edited_noise, noise, latents, alpha, alpha_prev)
        else:
            latents = ddim_move(noise_fn(latents, timestep), latents, alpha, alpha_prev)
    images, edited_images = decode(latents).chunk(2)
    loss, terms = zip_loss(edited_images, images, embed, text_direction, weights)
    if teacher is not None:
        imitation = F.mse_loss(edited_images, teacher.images)
        loss = loss + teacher.weight * imitation
        terms = {**terms, "teacher": imitation.detach()}
    if prior is None:
        return loss, terms
    return loss + prior.weight * prior_loss(latents[batch:], prior).mean(), terms
