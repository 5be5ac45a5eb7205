"""DiffusionCLIP (Kim, Kwon & Ye, CVPR 2022): fine-tune the denoiser towards a text direction, then edit
any image of the domain in one deterministic forward-generative pass.

Pure torch: no Ray, no files. Training (`pipeline.training.diffusion_clip`) and editing
(`pipeline.editors`) call these functions.

Legend (papers/004; latent diffusion, so x is the VAE latent and images come from DEC(x)):

    t0                    the return step: the forward process stops at t0 < T (paper: 300..600 of 1000)
    S_for, S_gen          steps of the forward (inversion) and generative grids between 0 and t0
                          (paper: (40, 6) for training, (200, 40) for inference); the two grids differ but
                          share t0, so x_t0 of the forward grid is where the generative grid starts
    ReturnGrid            levels tau_0 = 0 < tau_1 < ... < tau_S = t0 (round(k t0 / S)); alpha_bar of
                          level 0 is the scheduler's clean end (final_alpha_cumprod), level k's is
                          alphas_cumprod[tau_k]
    f_theta(x_t, t)       (x_t - sqrt(1 - alpha_bar_t) eps_theta(x_t, t)) / sqrt(alpha_bar_t), eq. 6
    forward(...)          eq. 12: x_{tau_{k+1}} = sqrt(a_{k+1}) f_theta(x_{tau_k}, tau_k)
                                                   + sqrt(1 - a_{k+1}) eps_theta(x_{tau_k}, tau_k)
    generate(...)         eq. 13: x_{tau_{k-1}} = sqrt(a_{k-1}) f_theta(x_{tau_k}, tau_k)
                                                   + sqrt(1 - a_{k-1}) eps_theta(x_{tau_k}, tau_k)
    x^0(theta^)           the generated image DEC(generate(x_t0)) of the fine-tuned model eps_theta^
    L_direction           eq. 9: 1 - cos(E_I(x^0) - E_I(x_0), E_T(y_tar) - E_T(y_ref)), unit-norm CLIP
                          embeddings E_I, E_T
    log form              the reference code's training loss -log((2 - L_direction) / 2) = -log((1 + cos) / 2)
                          (`clip_finetune`), per image: 0 where cos = 1 like eq. 9, but its gradient
                          1 / (1 + cos) times eq. 9's weighs the images that have moved least the most
    floor                 optional (not in the paper): L_direction counts only above a floor, max(0, L - floor),
                          so an image whose edit already scores the cosine that true edits of the attribute
                          score (1 - floor) is no longer pushed further along the CLIP's direction, where a
                          small CLIP rewards changes that are not the attribute
    ΔT_keep               ΔT minus its projection on span{E_T(y'_k) - E_T(y_k)}, the text directions of
                          attributes the edit must keep (not in the paper: it plays the part of the
                          paper's identity loss where the CLIP entangles a kept attribute with the target;
                          an image change along a kept direction then lowers cos(ΔI, ΔT_keep))
    views                 optional (not in the paper): L_direction averaged over V shifted / mirrored views
                          of x^0 and x_0, the same V for both (reflect-padded crops), so that the editor
                          cannot satisfy the CLIP with patterns tied to its patch grid
    ensemble              optional (not in the paper): L_direction averaged over K CLIPs, each with its own
                          E_I, E_T and ΔT of the same texts, so that a change which one CLIP mistakes for
                          the attribute (its shortcut) is rewarded only as far as the others agree; rows of
                          the K members are stacked member-major, zero-padded to the widest embedding
                          (`member_rows`), which leaves every cosine of eq. 9 that member's own
    L_id                  eq. 11: lambda_L1 ||x_0 - x^0||_1 (mean absolute error of images in [-1, 1];
                          the face-identity term is not used)
    loss                  eq. 10: L_direction + L_id
    L_prior               optional (not in the paper): score distillation (Poole et al., DreamFusion, 2022)
                          from the frozen original model as a prior on x^0's latent z: z_t = sqrt(a_t) z
                          + sqrt(1 - a_t) eps at one drawn t, and a loss whose gradient in z is
                          (eps_theta(z_t, t) - eps) / numel (the UNet's Jacobian dropped), which moves z
                          towards images the original model finds likely, so that the editor is not
                          rewarded for fragments that fool the CLIP but are not images of the domain
    eps~(z_t, t; y)       the frozen model's noise at condition y with classifier-free guidance w:
                          eps(z_t, t; "") + w (eps(z_t, t; y) - eps(z_t, t; "")) (`guided`); the prior may
                          be conditioned on the editor's prompt or on each image's y_tar
    delta form            optional (not in the paper): Delta Denoising Score (Hertz, Aberman & Cohen-Or,
                          ICCV 2023): the gradient in z is (eps~(z_t, t; y_tar) - eps~(zs_t, t; y_ref))
                          / numel, where zs_t = sqrt(a_t) zs + sqrt(1 - a_t) eps noises the source latent
                          zs with the same (t, eps); the drawn eps is replaced by the model's own reading of
                          the source, so that what remains is the change from y_ref to y_tar (zero at the
                          source when y_tar = y_ref), not score distillation's pull towards the mode
    full backprop         one loss on the final x^0, differentiated through all S_gen UNet calls and DEC
    memory-efficient      the reference code's `clip_finetune_eff`: at every generative step the loss of
                          the step's prediction DEC(f_theta(x_t, t)), one backward and one optimiser step;
                          x_t is detached between steps, so memory is that of one UNet call
    gamma_i(t)            eq. 14: weights of M fine-tuned models at step t, sum_i gamma_i(t) = 1;
                          x_{t-1} = sqrt(a_{t-1}) sum_i gamma_i f_i + sqrt(1 - a_{t-1}) sum_i gamma_i eps_i,
                          which equals one DDIM step with eps = sum_i gamma_i eps_i (f is affine in eps)
    continuous transition the pair (original eps_theta, fine-tuned eps_theta^) with weights (1 - gamma, gamma)
    windows               gamma_i(t) = gamma_i for t in editor i's window [low_i, high_i], else 0, and the
                          original model gets 1 - sum_i gamma_i(t): eq. 14 with piecewise-constant weights,
                          as the reference code's `hybrid_config` ({threshold: ratios}) sets them, e.g. one
                          editor on the early (large t) steps where the structure forms and another after
    conjunction           eps = eps_theta + sum_i gamma_i(t) (eps_i - eps_theta): eq. 14's weights over (original,
                          editors) with the original's 1 - sum_i gamma_i(t) allowed below 0, so that each
                          editor's change applies in full instead of being shared out; the AND of Composable
                          Diffusion (Liu et al., ECCV 2022) in noise space, not in the DiffusionCLIP paper
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler

from pipeline.diffusion.ddim import ddim_move

# Re-exported: callers name windows as dc.Window and dc.ALL_STEPS.
from pipeline.methods.editor_windows import ALL_STEPS as ALL_STEPS
from pipeline.methods.editor_windows import Combination as Combination
from pipeline.methods.editor_windows import Window as Window
from pipeline.methods.editor_windows import check_weights

# eps_theta(x_t, t) -> (B, C, h, w); the caller binds the UNet and the conditioning.
NoiseFn = Callable[[torch.Tensor, int], torch.Tensor]
# latents (B, C, h, w) -> images (B, 3, H, W) in [-1, 1], differentiable.
DecodeFn = Callable[[torch.Tensor], torch.Tensor]
# images (B, 3, H, W) in [0, 1] -> unit-norm CLIP image embeddings (B, D), differentiable.
EmbedFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ReturnGrid:
    """A DDIM grid from the clean end (level 0) to the return step t0 (level S).

    Attributes:
        timesteps: (S + 1,) long, tau_0 = 0 < ... < tau_S = t0; the UNet sees tau_k at level k.
        alphas: (S + 1,) float64 alpha_bar per level; alphas[0] is the scheduler's clean end.
    """

    timesteps: torch.Tensor
    alphas: torch.Tensor

    @classmethod
    def from_scheduler(cls, scheduler: DDIMScheduler, return_step: int, num_steps: int) -> ReturnGrid:
        """S = `num_steps` DDIM steps between the clean end and t0 = `return_step`.

        Args:
            scheduler: a DDIMScheduler (its alphas_cumprod and final_alpha_cumprod).
            return_step: t0, in [1, num_train_timesteps - 1].
            num_steps: S, in [1, t0].

        Raises:
            ValueError: t0 or S out of range.
        """
        train_steps = scheduler.config.num_train_timesteps
        if not 1 <= return_step < train_steps:
            raise ValueError(
                f"return step t0={return_step} must be in [1, {train_steps - 1}] (paper: 300..600)"
            )
        if not 1 <= num_steps <= return_step:
            raise ValueError(f"num_steps={num_steps} must be in [1, t0={return_step}] (paper: 40 and 6)")
        levels = torch.round(
            torch.arange(num_steps + 1, dtype=torch.float64) * return_step / num_steps
        ).long()
        alphas = scheduler.alphas_cumprod.to(torch.float64)[levels].clone()
        alphas[0] = float(scheduler.final_alpha_cumprod)
        return cls(timesteps=levels, alphas=alphas)

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.numel()) - 1

    @property
    def return_step(self) -> int:
        return int(self.timesteps[-1])

    def alpha(self, level: int) -> float:
        return float(self.alphas[level])


def predict_clean(noise: torch.Tensor, latents: torch.Tensor, alpha: float) -> torch.Tensor:
    """f_theta(x_t, t) = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."""
    return (latents - (1.0 - alpha) ** 0.5 * noise) / alpha**0.5


def forward(noise_fn: NoiseFn, grid: ReturnGrid, clean_latents: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM forward process (eq. 12) from x_0 to x_t0 over `grid`, without gradients.

    Args:
        noise_fn: eps_theta of the original model.
        grid: the forward grid (S_for steps).
        clean_latents: x_0, (B, C, h, w).

    Returns:
        x_t0, (B, C, h, w).
    """
    latents = clean_latents
    with torch.no_grad():
        for level in range(grid.num_steps):
            noise = noise_fn(latents, int(grid.timesteps[level]))
            latents = ddim_move(noise, latents, grid.alpha(level), grid.alpha(level + 1))
    return latents


def generate(noise_fn: NoiseFn, grid: ReturnGrid, start_latents: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM generative process (eq. 13) from x_t0 to x_0; differentiable when the noise is.

    Args:
        noise_fn: eps_theta (or a combination of models, `combined_noise_fn`).
        grid: the generative grid (S_gen steps), ending at the forward grid's t0.
        start_latents: x_t0, (B, C, h, w).

    Returns:
        x^0, (B, C, h, w).
    """
    latents = start_latents
    for level in range(grid.num_steps, 0, -1):
        noise = noise_fn(latents, int(grid.timesteps[level]))
        latents = ddim_move(noise, latents, grid.alpha(level), grid.alpha(level - 1))
    return latents


def direction_loss(
    edited_embeddings: torch.Tensor, source_embeddings: torch.Tensor, text_direction: torch.Tensor
) -> torch.Tensor:
    """L_direction (eq. 9) per image: 1 - cos(ΔI, ΔT).

    Args:
        edited_embeddings: (B, D) unit-norm E_I(x^0).
        source_embeddings: (B, D) unit-norm E_I(x_0).
        text_direction: (B, D) or (D,) ΔT = E_T(y_tar) - E_T(y_ref).

    Returns:
        (B,) losses in [0, 2].
    """
    image_direction = edited_embeddings - source_embeddings
    return 1.0 - F.cosine_similarity(image_direction, text_direction.expand_as(image_direction), dim=-1)


def without_kept_directions(
    text_directions: torch.Tensor, kept_directions: torch.Tensor, rtol: float = 1e-6
) -> torch.Tensor:
    """ΔT_keep: the text directions with their components in the span of the kept directions removed.

    Args:
        text_directions: (N, D) ΔT.
        kept_directions: (K, D) directions of attributes the edit must keep (K may be 0; they need not
            be independent: the span is read off the singular values above rtol times the largest).
        rtol: relative tolerance below which a singular direction counts as outside the span.

    Returns:
        (N, D) ΔT projected on the orthogonal complement of span(kept_directions).
    """
    if kept_directions.shape[0] == 0:
        return text_directions
    _, singular_values, right_vectors = torch.linalg.svd(kept_directions, full_matrices=False)
    basis = right_vectors[singular_values > rtol * singular_values.max()]  # (r, D), orthonormal rows
    return text_directions - (text_directions @ basis.T) @ basis


def member_rows(per_member: Sequence[torch.Tensor]) -> torch.Tensor:
    """Several CLIPs' embeddings (or directions) of the same N rows as one tensor for `direction_loss`.

    Each member's rows are zero-padded to the widest member's width, so the cosine between two rows of
    one member is that member's own and the mean of `direction_loss` over all rows is the members' mean
    L_direction (each member weighs the same).

    Args:
        per_member: K tensors (N, D_k), one per CLIP, rows in the same order.

    Returns:
        (K * N, max_k D_k), member-major: row k * N + n is member k's row n.
    """
    width = max(rows.shape[-1] for rows in per_member)
    return torch.cat([F.pad(rows, (0, width - rows.shape[-1])) for rows in per_member])


def ensemble_embed(embeds: Sequence[EmbedFn]) -> EmbedFn:
    """E_I of K CLIPs as one EmbedFn: images (B, 3, H, W) in [0, 1] -> `member_rows` of their unit-norm
    embeddings, (K * B, max_k D_k)."""
    return lambda images: member_rows([embed(images) for embed in embeds])


@dataclass(frozen=True)
class View:
    """One view of an image: shifted by (dx, dy) pixels (reflect-padded) and mirrored left-right if flip."""

    dx: int
    dy: int
    flip: bool


def random_views(count: int, max_shift: int, generator: torch.Generator) -> list[View]:
    """`count` views with shifts uniform in [-max_shift, max_shift] and a fair coin for the mirror."""
    shifts = torch.randint(-max_shift, max_shift + 1, (count, 2), generator=generator).tolist()
    flips = torch.randint(0, 2, (count,), generator=generator).tolist()
    return [View(dx, dy, bool(flip)) for (dx, dy), flip in zip(shifts, flips, strict=True)]


def apply_views(images: torch.Tensor, views: Sequence[View]) -> torch.Tensor:
    """Every view of every image, view-major: (V * B, C, H, W) from (B, C, H, W); differentiable.

    Row v * B + b is image b seen through view v: out[..., y, x] = image[..., y - dy, x - dx], with the
    image reflected at its borders (so a shift adds no constant band), then mirrored when flip.
    """
    margin = max([abs(view.dx) for view in views] + [abs(view.dy) for view in views] + [0])
    padded = F.pad(images, (margin, margin, margin, margin), mode="reflect") if margin else images
    height, width = images.shape[-2:]
    out = []
    for view in views:
        top, left = margin - view.dy, margin - view.dx
        crop = padded[..., top : top + height, left : left + width]
        out.append(crop.flip(-1) if view.flip else crop)
    return torch.cat(out)


def identity_loss(edited_images: torch.Tensor, source_images: torch.Tensor) -> torch.Tensor:
    """||x_0 - x^0||_1 of eq. 11 per image, the mean absolute difference of images in [-1, 1]."""
    return (edited_images - source_images).abs().flatten(1).mean(dim=1)


@dataclass(frozen=True)
class LossInputs:
    """What the loss of eq. 10 compares a generated batch with.

    Attributes:
        source_images: x_0, (B, 3, H, W) in [-1, 1].
        source_embeddings: (B, D) unit-norm E_I(x_0).
        text_direction: (B, D) or (D,) ΔT.
        l1_weight: lambda_L1 (paper: 0.3).
        direction_weight: weight of L_direction (paper: 1).
        direction_form: "cosine" (eq. 9 as written) or "log" (the reference code's -log((1 + cos) / 2)).
        direction_floor: L_direction below this counts as 0 (max(0, L - floor), before the form); 0 = eq. 9.
    """

    source_images: torch.Tensor
    source_embeddings: torch.Tensor
    text_direction: torch.Tensor
    l1_weight: float = 0.3
    direction_weight: float = 1.0
    direction_form: Literal["cosine", "log"] = "cosine"
    direction_floor: float = 0.0


def diffusion_clip_loss(
    edited_images: torch.Tensor, embed: EmbedFn, inputs: LossInputs
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. 10: mean over the batch of direction_weight L_direction + lambda_L1 ||x_0 - x^0||.

    Args:
        edited_images: x^0, (B, 3, H, W) in [-1, 1], differentiable.
        embed: the CLIP image encoder (images in [0, 1] -> unit-norm embeddings).
        inputs: the batch's sources, text direction and weights.

    Returns:
        The scalar loss and its detached terms {"direction", "l1"} (batch means; "direction" is eq. 9's
        1 - cos whichever form is trained, so that runs of both forms compare).
    """
    edited_embeddings = embed(((edited_images + 1.0) / 2.0).clamp(0.0, 1.0))
    per_image = direction_loss(edited_embeddings, inputs.source_embeddings, inputs.text_direction)
    above_floor = (per_image - inputs.direction_floor).clamp_min(0.0)
    trained = above_floor if inputs.direction_form == "cosine" else log_direction_loss(above_floor)
    l1 = identity_loss(edited_images, inputs.source_images).mean()
    loss = inputs.direction_weight * trained.mean() + inputs.l1_weight * l1
    return loss, {"direction": per_image.mean().detach(), "l1": l1.detach()}


def log_direction_loss(direction_losses: torch.Tensor) -> torch.Tensor:
    """The reference code's form of L_direction: -log((2 - L) / 2) = -log((1 + cos) / 2), elementwise.

    Args:
        direction_losses: eq. 9's L_direction = 1 - cos, any shape, values in [0, 2].

    Returns:
        Same shape, values in [0, inf): 0 where cos = 1.
    """
    # cos = -1 (L = 2) would be log(0); clamp to float32's tiny so the loss stays finite.
    return -torch.log(((2.0 - direction_losses) / 2.0).clamp_min(torch.finfo(direction_losses.dtype).tiny))


@dataclass(frozen=True)
class PriorReference:
    """The source side of L_prior's delta form (see the legend).

    Attributes:
        noise_fn: eps~(., t; y_ref) of the frozen original model.
        latents: the sources' latents zs, (B, C, h, w).
    """

    noise_fn: NoiseFn
    latents: torch.Tensor


@dataclass(frozen=True)
class PriorTerm:
    """One draw of L_prior (see the legend) for a batch.

    Attributes:
        noise_fn: eps~(., t; y) of the frozen original model (no gradients reach it), y the editor's
            prompt or each image's y_tar.
        timestep: t of this draw.
        alpha: alpha_bar_t.
        noise: eps, (B, C, h, w).
        weight: lambda_prior.
        reference: None (score distillation: the residual's baseline is eps) or the delta form's source
            side (the baseline is eps~(zs_t, t; y_ref)).
    """

    noise_fn: NoiseFn
    timestep: int
    alpha: float
    noise: torch.Tensor
    weight: float
    reference: PriorReference | None = None


def guided(conditional: NoiseFn, unconditional: NoiseFn, scale: float) -> NoiseFn:
    """eps~ = eps(.; "") + w (eps(.; y) - eps(.; "")): classifier-free guidance of two noise functions.

    Args:
        conditional: eps(., t; y).
        unconditional: eps(., t; "").
        scale: w (1: the conditional alone, which is then the only one called).
    """
    if scale == 1.0:
        return conditional

    def noise(latents: torch.Tensor, timestep: int) -> torch.Tensor:
        without = unconditional(latents, timestep)
        return without + scale * (conditional(latents, timestep) - without)

    return noise


def prior_loss(latents: torch.Tensor, prior: PriorTerm) -> torch.Tensor:
    """L_prior per image: a surrogate whose gradient in `latents` is (eps~(z_t, t) - baseline) / numel,
    the baseline eps (score distillation) or eps~(zs_t, t; y_ref) (the delta form).

    Args:
        latents: x^0's latents z, (B, C, h, w), differentiable.
        prior: the draw (t, eps), the frozen model and, for the delta form, the sources.

    Returns:
        (B,) values (meaningless as numbers; only their gradient counts).
    """
    root_alpha, root_sigma = prior.alpha**0.5, (1.0 - prior.alpha) ** 0.5
    noisy = root_alpha * latents.detach() + root_sigma * prior.noise
    with torch.no_grad():
        baseline = prior.noise
        if prior.reference is not None:
            noisy_sources = root_alpha * prior.reference.latents + root_sigma * prior.noise
            baseline = prior.reference.noise_fn(noisy_sources, prior.timestep)
        residual = prior.noise_fn(noisy, prior.timestep) - baseline
    return (residual * latents).flatten(1).mean(dim=1)


def full_backprop_loss(
    noise_fn: NoiseFn,
    grid: ReturnGrid,
    start_latents: torch.Tensor,
    decode: DecodeFn,
    embed: EmbedFn,
    inputs: LossInputs,
    prior: PriorTerm | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of eq. 10 on x^0 generated from x_t0, differentiable through every generative step.

    Args:
        noise_fn: eps_theta^ of the model being fine-tuned.
        grid: the generative grid (S_gen steps).
        start_latents: x_t0 from `forward`, (B, C, h, w).
        decode: DEC, latents -> images in [-1, 1].
        embed: the CLIP image encoder.
        inputs: sources, text direction and weights.
        prior: L_prior's draw, or None (the paper's loss).

    Returns:
        The scalar loss and its terms.
    """
    latents = generate(noise_fn, grid, start_latents)
    loss, terms = diffusion_clip_loss(decode(latents), embed, inputs)
    if prior is None:
        return loss, terms
    return loss + prior.weight * prior_loss(latents, prior).mean(), terms


def memory_efficient_losses(
    noise_fn: NoiseFn,
    grid: ReturnGrid,
    start_latents: torch.Tensor,
    decode: DecodeFn,
    embed: EmbedFn,
    inputs: LossInputs,
) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """One loss per generative step, for one backward and one optimiser step each.

    At level k the loss of eq. 10 is taken on DEC(f_theta^(x_{tau_k}, tau_k)), the step's prediction of
    the clean latent; x_{tau_{k-1}} is computed from the same noise before the caller steps the
    optimiser and is detached, so each loss reaches the parameters through one UNet call only.

    Args:
        noise_fn: eps_theta^ of the model being fine-tuned.
        grid: the generative grid (S_gen steps).
        start_latents: x_t0, (B, C, h, w).
        decode: DEC, latents -> images in [-1, 1].
        embed: the CLIP image encoder.
        inputs: sources, text direction and weights.

    Yields:
        (loss, terms) of levels S_gen .. 1 in turn; the caller backpropagates and steps between yields.
    """
    latents = start_latents.detach()
    for level in range(grid.num_steps, 0, -1):
        noise = noise_fn(latents, int(grid.timesteps[level]))
        clean = predict_clean(noise, latents, grid.alpha(level))
        next_latents = ddim_move(noise, latents, grid.alpha(level), grid.alpha(level - 1)).detach()
        yield diffusion_clip_loss(decode(clean), embed, inputs)
        latents = next_latents


def combined_noise(noises: Sequence[torch.Tensor], gammas: Sequence[float]) -> torch.Tensor:
    """sum_i gamma_i eps_i (eq. 14).

    Args:
        noises: M noise predictions of the same shape.
        gammas: M weights summing to 1.

    Raises:
        ValueError: counts differ, or the weights do not sum to 1.
    """
    if len(noises) != len(gammas) or not noises:
        raise ValueError(f"need one gamma per model: {len(noises)} models, {len(gammas)} gammas")
    total = float(sum(gammas))
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"gammas {list(gammas)} sum to {total:.6g}; eq. 14 needs sum_i gamma_i(t) = 1")
    combined = gammas[0] * noises[0]
    for gamma, noise in zip(gammas[1:], noises[1:], strict=True):
        combined = combined + gamma * noise
    return combined


# gamma(t) -> M weights for the models at timestep t.
GammaSchedule = Callable[[int], Sequence[float]]


def constant_gammas(gammas: Sequence[float]) -> GammaSchedule:
    """gamma_i(t) = gamma_i at every t."""
    weights = tuple(float(gamma) for gamma in gammas)
    return lambda timestep: weights


def combined_noise_fn(noise_fns: Sequence[NoiseFn], gammas: GammaSchedule) -> NoiseFn:
    """eps(x_t, t) = sum_i gamma_i(t) eps_i(x_t, t): M models sampled as one (eq. 14).

    A model whose weight is 0 at t is not evaluated.
    """

    def noise_fn(latents: torch.Tensor, timestep: int) -> torch.Tensor:
        weights = list(gammas(timestep))
        if len(weights) != len(noise_fns):
            raise ValueError(f"gamma schedule gave {len(weights)} weights for {len(noise_fns)} models")
        used = [index for index, weight in enumerate(weights) if weight != 0.0]
        if abs(sum(weights) - 1.0) > 1e-6 or not used:
            raise ValueError(f"gammas {weights} at t={timestep} must sum to 1 (eq. 14)")
        return combined_noise([noise_fns[i](latents, timestep) for i in used], [weights[i] for i in used])

    return noise_fn


def transition_gammas(gamma: float) -> GammaSchedule:
    """Continuous transition: weights (1 - gamma, gamma) of (original model, fine-tuned model)."""
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"transition gamma={gamma} must be in [0, 1]")
    return constant_gammas((1.0 - gamma, gamma))


def windowed_gammas(
    gammas: Sequence[float],
    windows: Sequence[Window],
    num_train_timesteps: int = 1000,
    combination: Combination = "convex",
) -> GammaSchedule:
    """Weights (original model, editor 1, ..., editor M) at t: editor i weighs gamma_i inside its window
    [low_i, high_i] and 0 outside; the original model gets the rest, 1 - sum_i gamma_i(t) (eq. 14).

    Args:
        gammas: M weights, in [0, 1] for "convex", >= 0 for "conjunction".
        windows: M inclusive timestep windows (low, high), 0 <= low <= high; a high of T or more runs to
            the last timestep T - 1.
        num_train_timesteps: the scheduler's T; every t in [0, T) is checked.
        combination: "convex" (eq. 14: the editors active at t weigh at most 1 together, the original
            model's share stays in [0, 1]) or "conjunction" (any sum; the original's share may be
            negative: eps_theta + sum_i gamma_i(t) (eps_i - eps_theta)).

    Raises:
        ValueError: counts differ, a weight or window is out of range, or, when convex, at some t the
            editors active there weigh more than 1 together.
    """
    check_weights(gammas, windows, combination)
    for low, high in windows:
        if not 0 <= low <= high or low >= num_train_timesteps:
            raise ValueError(
                f"window [{low}, {high}] must satisfy 0 <= low <= high, low < {num_train_timesteps}"
            )
    table = torch.zeros(num_train_timesteps, len(gammas) + 1, dtype=torch.float64)
    for index, (gamma, (low, high)) in enumerate(zip(gammas, windows, strict=True), start=1):
        table[low : min(high, num_train_timesteps - 1) + 1, index] = float(gamma)
    editors_total = table[:, 1:].sum(1)
    # Rounding (0.7 + 0.3) must not leave the original model a weight of 1e-16 and so an extra UNet call.
    rest = 1.0 - editors_total
    table[:, 0] = torch.where(rest.abs() > 1e-9, rest, torch.zeros_like(rest))
    rows = [tuple(float(w) for w in row) for row in table.tolist()]
    return lambda timestep: rows[timestep]
