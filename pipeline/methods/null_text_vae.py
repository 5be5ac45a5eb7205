"""Stochastic null-text embeddings (Park et al., "Adding stochastic features in DDIM inversion based image
editing", §3.1): a VAE over an image's optimised null-text embeddings whose samples phi'_t still
reconstruct the image, so that every sampled sequence gives a different edit.

Legend:

    z*_0..z*_T      pivotal trajectory (null-text inversion: DDIM with w = 1 and the source prompt C)
    phi_t           null-text inversion's optimised unconditional embedding at step t, (L, D)
    z~_t            the null-text reconstruction's latent at the start of step t (its path)
    gamma(t)        sinusoidal embedding of the timestep t
    encoder         (phi_t, t) -> (mu_t, log sigma_t^2) in R^Z: a 1x1 reduction of every token's D
                    channels to r, the flattened sequence (L r) next to gamma(t), one hidden layer
                    (sequence-level MLP: the paper found token-level MLPs collapse texture)
    u_t             mu_t + tau * sigma_t * eps_t, eps_t ~ N(0, I): the reparameterised sample; tau is the
                    sampling temperature (1 while training)
    decoder         u_t -> D(u_t): one hidden layer, (L r) outputs, a 1x1 expansion back to D channels;
                    D starts at zero
    phi'_t          `decoder_base: mean`: phi_bar + D(u_t), phi_bar the mean of phi_t over t, so the
                    step-dependent part of phi_t must travel through u_t (the paper's plain decoder);
                    `decoder_base: input`: phi_t + D(u_t), the residual form of the conditional VAE's
                    C'' = C' + D(u) (§3.2: "overall architecture is the same"), so the untrained VAE
                    reconstructs exactly as null-text and training shapes the samples' spread
    L_rec           || z*_{t-1} - z_{t-1}(z~_t, phi'_t, C) ||^2 (MSE), the null-text step's loss, CFG w
    L_reg           KL(N(mu_t, sigma_t^2) || N(0, I)) = -1/2 sum_j (1 + log sigma_j^2 - mu_j^2 - sigma_j^2)
    L_phi           alpha * L_rec + beta_k * L_reg                                           (eq. 1)
    beta_k          cyclical annealing (Fu et al.): k-th iteration of K in M cycles; beta rises linearly
                    over the first `kl_ramp` of each cycle, then stays at beta
    training        `epochs` passes over the S steps, one step per iteration; every image has its own VAE
                    (weights stacked along a leading image axis). `training_path: sampled` walks each
                    pass in sampling order from z*_T along the VAE's own sampled latents (z_{t-1} of one
                    iteration is the next one's start, detached), as null-text fits phi_t on its own
                    path; `training_path: null_text` starts every step from z~_t in an order drawn from
                    the seed (teacher forcing: the per-step loss falls while the free-running samples
                    drift from the source, benchmarks/stochastic_null_text.py)
    dataset VAE     `vae` (the paper's amortised option): one VAE (a single weight slice) trained by
                    `inversa train` (kind null_text_vae, `pipeline.training.null_text_vae`) over many
                    images' null-text embeddings with the same step (`sampled_null_text_step`) and loss
                    (`step_losses`); every image of a batch samples from it and none is trained here

Batching: each image's VAE has its own slice of every weight, the summed loss gives each slice the
gradient of its own image's loss, and Adam works elementwise, so B images trained together equal B
separate runs with the same seed.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from pipeline.diffusion.errors import EngineInputError
from pipeline.diffusion.precision import fixed_branch_noise, optimised_branch_noise
from pipeline.diffusion.trajectory import EditHook, InversionInputs, MethodResult, per_step
from pipeline.methods import NullTextVAEParams
from pipeline.methods.null_text import pivotal_null_text

TIME_EMBEDDING_DIM = 32


def timestep_embedding(timesteps: torch.Tensor, dim: int = TIME_EMBEDDING_DIM) -> torch.Tensor:
    """gamma(t): (N,) timesteps -> (N, dim) sinusoidal features (cosines then sines)."""
    half = dim // 2
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    angles = timesteps.float().cpu()[:, None] * frequencies[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """L_reg per row: KL(N(mu, exp(logvar)) || N(0, I)) summed over the latent dimensions."""
    return -0.5 * (1.0 + logvar - mu.pow(2) - logvar.exp()).sum(dim=-1)


def cyclical_beta(iteration: int, total: int, beta: float, cycles: int, ramp: float) -> float:
    """beta_k of Fu et al.'s cyclical schedule: linear from 0 over the first `ramp` of each cycle."""
    period = total / max(cycles, 1)
    position = (iteration % period) / period
    return beta * min(1.0, position / ramp) if ramp > 0 else beta


class EmbeddingVAE(torch.nn.Module):
    """B independent VAEs over (L, D) embeddings; every weight has a leading image axis.

    Args:
        images: B.
        tokens: L.
        channels: D.
        params: sizes (latent_dim, reduced_channels, hidden_dim).
        base: (B, L, D) phi_bar, the decoder's offset per image.
        generator: draws the initial weights; every image starts from the same draw.
        add_input: `sample` adds the encoded embeddings to the decode (phi_t + D(u_t); base is then
            usually zero).
    """

    def __init__(
        self,
        images: int,
        tokens: int,
        channels: int,
        params: NullTextVAEParams,
        base: torch.Tensor,
        generator: torch.Generator,
        add_input: bool,
    ):
        super().__init__()
        reduced, hidden, latent = params.reduced_channels, params.hidden_dim, params.latent_dim
        flat = tokens * reduced

        def linear(fan_in: int, fan_out: int, zero: bool = False) -> tuple[torch.nn.Parameter, ...]:
            bound = 1.0 / math.sqrt(fan_in)
            weight = (torch.rand(fan_in, fan_out, generator=generator) * 2 - 1) * bound
            bias = (torch.rand(fan_out, generator=generator) * 2 - 1) * bound
            if zero:
                weight, bias = torch.zeros_like(weight), torch.zeros_like(bias)
            # One copy per image: every image's VAE starts from the same draw.
            return tuple(torch.nn.Parameter(t.expand(images, *t.shape).clone()) for t in (weight, bias))

        self.reduce_weight, self.reduce_bias = linear(channels, reduced)
        self.encode_weight, self.encode_bias = linear(flat + TIME_EMBEDDING_DIM, hidden)
        self.mu_weight, self.mu_bias = linear(hidden, latent)
        self.logvar_weight, self.logvar_bias = linear(hidden, latent)
        self.decode_weight, self.decode_bias = linear(latent, hidden)
        self.unflatten_weight, self.unflatten_bias = linear(hidden, flat)
        self.expand_weight, self.expand_bias = linear(reduced, channels, zero=True)
        self.register_buffer("base", base.detach().clone())
        self.tokens, self.reduced, self.add_input = tokens, reduced, add_input

    @staticmethod
    def _layer(
        x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, images: torch.Tensor
    ) -> torch.Tensor:
        """Row n through image images[n]'s layer: x (N, ..., in) -> (N, ..., out)."""
        w, b = weight[images], bias[images]
        out = torch.einsum("n...i,nio->n...o", x, w)
        return out + b.view(b.shape[0], *([1] * (out.ndim - 2)), b.shape[1])

    def encode(
        self, embeddings: torch.Tensor, timesteps: torch.Tensor, images: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, L, D) phi_t, (N,) t, (N,) image of each row -> mu, logvar, each (N, Z)."""
        reduced = self._layer(embeddings, self.reduce_weight, self.reduce_bias, images)
        features = torch.cat(
            [reduced.flatten(1), timestep_embedding(timesteps).to(embeddings.device, embeddings.dtype)], dim=1
        )
        hidden = torch.nn.functional.silu(self._layer(features, self.encode_weight, self.encode_bias, images))
        return (
            self._layer(hidden, self.mu_weight, self.mu_bias, images),
            self._layer(hidden, self.logvar_weight, self.logvar_bias, images),
        )

    def decode(self, latents: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """(N, Z) u_t, (N,) image of each row -> (N, L, D) phi'_t."""
        hidden = torch.nn.functional.silu(self._layer(latents, self.decode_weight, self.decode_bias, images))
        flat = self._layer(hidden, self.unflatten_weight, self.unflatten_bias, images)
        tokens = flat.view(flat.shape[0], self.tokens, self.reduced)
        return self.base[images] + self._layer(tokens, self.expand_weight, self.expand_bias, images)

    def sample(
        self,
        embeddings: torch.Tensor,
        timesteps: torch.Tensor,
        images: torch.Tensor,
        noise: torch.Tensor,
        temperature: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """phi'_t = decoder(mu + temperature * sigma * noise) (+ phi_t with `add_input`); returns
        (phi', mu, logvar)."""
        mu, logvar = self.encode(embeddings, timesteps, images)
        latents = mu + temperature * torch.exp(0.5 * logvar) * noise
        decoded = self.decode(latents, images)
        return (embeddings + decoded if self.add_input else decoded), mu, logvar


@dataclasses.dataclass
class TrainingHistory:
    """Per iteration (rows) and image (columns): the step trained, L_rec, L_reg, beta_k and L_phi."""

    step_index: list[int]
    reconstruction: torch.Tensor
    kl: torch.Tensor
    beta: list[float]
    loss: torch.Tensor


def train_vae(
    inputs: InversionInputs,
    trajectory: torch.Tensor,
    path: torch.Tensor,
    null_text: torch.Tensor,
    params: NullTextVAEParams,
    errors: list[str | None],
) -> tuple[EmbeddingVAE, TrainingHistory]:
    """Train every image's VAE along its null-text trajectory (eq. 1 with cyclical beta).

    Args:
        inputs: the batch (UNet, schedule, C, w).
        trajectory: (S+1, B, C, h, w) pivots z*.
        path: (S, B, C, h, w) z~_t at the start of each step.
        null_text: (S, B, L, D) phi_t.
        params: the method's parameters.
        errors: per-image error slots; failed images are left out of the loss, a non-finite loss fails
            its image.

    Returns:
        The trained VAEs and the loss history.
    """
    unet, schedule, steps = inputs.unet, inputs.schedule, inputs.schedule.num_steps
    batch, tokens, channels = null_text.shape[1:]
    device = null_text.device
    generator = torch.Generator().manual_seed(params.seed)
    add_input = params.decoder_base == "input"
    base = torch.zeros_like(null_text[0]) if add_input else null_text.mean(dim=0)
    vae = EmbeddingVAE(batch, tokens, channels, params, base, generator, add_input).to(device)
    optimizer = torch.optim.Adam(vae.parameters(), lr=params.vae_learning_rate)
    images = torch.arange(batch, device=device)
    timesteps = schedule.timesteps.tolist()
    # Failed images stay in the batch with finite stand-ins and a zero weight: no gradient reaches them.
    path, trajectory = torch.nan_to_num(path), torch.nan_to_num(trajectory)
    sampled_path = params.training_path == "sampled"
    with torch.no_grad():
        # On null-text's path the conditional branch of every step is fixed: computed once.
        cond_noise = [
            fixed_branch_noise(unet, path[i], timesteps[i], inputs.cond_embeddings)
            for i in range(0 if sampled_path else steps)
        ]
    total = params.epochs * steps
    history = TrainingHistory(
        [], *(torch.zeros(total, batch) for _ in range(2)), [], torch.zeros(total, batch)
    )
    order: list[int] = []
    latents = path[0]
    for iteration in range(total):
        if iteration % steps == 0:
            # `sampled`: every epoch walks the steps in sampling order from z*_T along the VAE's own
            # sampled path, as null-text inversion fits phi_t on its own path.
            order = (
                list(range(steps)) if sampled_path else torch.randperm(steps, generator=generator).tolist()
            )
            latents = path[0]
        step_index = order[iteration % steps]
        start = latents if sampled_path else path[step_index]
        beta = cyclical_beta(iteration, total, params.beta, params.kl_cycles, params.kl_ramp)
        timestep = timesteps[step_index]
        noise = torch.randn(1, params.latent_dim, generator=generator).to(device).expand(batch, -1)
        if sampled_path:
            with torch.no_grad():
                cond = fixed_branch_noise(unet, start, timestep, inputs.cond_embeddings)
        else:
            cond = cond_noise[step_index]
        landed, mu, logvar = sampled_null_text_step(
            unet,
            schedule,
            vae,
            start,
            timestep,
            null_text[step_index],
            images,
            noise,
            cond,
            inputs.guidance_scale,
        )
        latents = torch.nan_to_num(landed.detach())
        losses, reconstruction, kl = step_losses(
            landed, trajectory[steps - step_index - 1], mu, logvar, params.alpha, beta
        )
        _fail_nonfinite(losses.detach(), errors, iteration, step_index)
        active = torch.tensor([error is None for error in errors], device=device, dtype=losses.dtype)
        optimizer.zero_grad(set_to_none=True)
        (torch.nan_to_num(losses) * active).sum().backward()
        optimizer.step()
        history.step_index.append(step_index)
        history.reconstruction[iteration] = reconstruction.detach().cpu()
        history.kl[iteration] = kl.detach().cpu()
        history.beta.append(beta)
        history.loss[iteration] = losses.detach().cpu()
    return vae, history


def sampled_null_text_step(
    unet: torch.nn.Module,
    schedule,
    vae: EmbeddingVAE,
    start: torch.Tensor,
    timestep: int,
    null_text: torch.Tensor,
    rows: torch.Tensor,
    noise: torch.Tensor,
    cond_noise: torch.Tensor,
    guidance_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One guided DDIM step of N latents with a sampled phi'_t as the unconditional embedding.

    Args:
        unet: eps_theta.
        schedule: the DDIM grid.
        start: (N, C, h, w) the latents at the start of the step.
        timestep: t.
        null_text: (N, L, D) phi_t.
        rows: (N,) which VAE of `vae` encodes each row.
        noise: (N, Z) eps_t.
        cond_noise: (N, C, h, w) the conditional branch's noise (fixed: C is not trained).
        guidance_scale: w.

    Returns:
        (N, C, h, w) z_{t-1} (differentiable in the VAE's weights), mu and logvar, each (N, Z).
    """
    timesteps = torch.full((start.shape[0],), timestep)
    sampled, mu, logvar = vae.sample(null_text, timesteps, rows, noise)
    uncond_noise = optimised_branch_noise(unet, start, timestep, sampled)
    guided = uncond_noise + guidance_scale * (cond_noise - uncond_noise)
    return schedule.step(guided, timestep, start), mu, logvar


def step_losses(
    landed: torch.Tensor,
    pivot: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    alpha: float,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 1 per row: (L_phi, L_rec, L_reg), each (N,), for z_{t-1} `landed` against the pivot z*_{t-1}."""
    reconstruction = (landed - pivot).pow(2).flatten(1).mean(dim=1)
    kl = kl_divergence(mu, logvar)
    return alpha * reconstruction + beta * kl, reconstruction, kl


def _fail_nonfinite(losses: torch.Tensor, errors: list[str | None], iteration: int, step_index: int) -> None:
    for image, finite in enumerate(torch.isfinite(losses).tolist()):
        if not finite and errors[image] is None:
            errors[image] = (
                f"image {image}: non-finite loss in null-text VAE training at iteration {iteration} "
                f"(step {step_index})"
            )


class NullTextVAEEditHook(EditHook):
    """Edits asking for a sample (`sample_temperature` set) run on a sampled phi' sequence drawn with
    their seed; the others, and every source row, keep the optimised null-text embeddings.

    Args:
        vae: B per-image VAEs, or one dataset-wide VAE (`shared`) that every image samples from.
        null_text: (S, B, L, D) phi_t.
        timesteps: (S,) the sampling steps' timesteps.
        history: the per-image VAEs' training history; None for a dataset-wide VAE (trained by a job).
        shared: `vae` holds one VAE for all images.
    """

    stochastic = True

    def __init__(
        self,
        vae: EmbeddingVAE,
        null_text: torch.Tensor,
        timesteps: torch.Tensor,
        history: TrainingHistory | None,
        shared: bool = False,
    ):
        self.vae, self.null_text, self.timesteps, self.history = vae, null_text, timesteps, history
        self.shared = shared

    def sample_embeddings(self, image: int, seed: int, temperature: float) -> torch.Tensor:
        """(S, L, D) phi'_1..phi'_S of `image`, reproducible from `seed` (noise drawn on the CPU)."""
        steps, latent = self.null_text.shape[0], self.vae.mu_weight.shape[-1]
        noise = torch.randn(steps, latent, generator=torch.Generator().manual_seed(seed))
        device = self.null_text.device
        images = torch.full((steps,), 0 if self.shared else image, device=device, dtype=torch.long)
        with torch.no_grad():
            sampled, _, _ = self.vae.sample(
                self.null_text[:, image], self.timesteps, images, noise.to(device), temperature
            )
        return sampled

    def edit_uncond_embeddings(self, reconstruction_embeddings: torch.Tensor, request) -> torch.Tensor:
        if request.sample_temperature is None:
            return reconstruction_embeddings
        return self.sample_embeddings(request.image_index, request.seed, request.sample_temperature)


def invert(inputs: InversionInputs, params: NullTextVAEParams) -> MethodResult:
    """Null-text inversion of all B images, then every image's VAE trained along its trajectory, or,
    with `params.vae`, the dataset-wide VAE in `inputs.embedding_vae` shared by all of them.

    Args:
        inputs: the batch, as for null-text inversion.
        params: null-text's settings and the VAE's.

    Returns:
        Null-text inversion's result (reconstruction and embeddings unchanged) with the edit hook that
        samples phi' sequences (it keeps the VAE's loss history).
    """
    if params.epochs < 1 or params.latent_dim < 1 or params.reduced_channels < 1 or params.hidden_dim < 1:
        raise EngineInputError(
            "null_text_vae: epochs, latent_dim, reduced_channels and hidden_dim must be at least 1."
        )
    if (params.vae is None) != (inputs.embedding_vae is None):
        raise EngineInputError(
            "null_text_vae: give the dataset-wide VAE (inputs.embedding_vae) exactly when params.vae names one."
        )
    trajectory, optimized = pivotal_null_text(inputs, params)
    errors = list(optimized.errors)
    if inputs.embedding_vae is not None:  # the amortised option: one VAE for all images, already trained
        hook = NullTextVAEEditHook(
            inputs.embedding_vae, optimized.embeddings, inputs.schedule.timesteps, None, shared=True
        )
    else:
        vae, history = train_vae(inputs, trajectory, optimized.path, optimized.embeddings, params, errors)
        hook = NullTextVAEEditHook(vae, optimized.embeddings, inputs.schedule.timesteps, history)
    return MethodResult(
        trajectory=trajectory,
        uncond_embeddings=optimized.embeddings,
        cond_embeddings=per_step(inputs.cond_embeddings, inputs.schedule.num_steps),
        reconstruction=optimized.reconstruction,
        errors=errors,
        edit_hook=hook,
        iterations=optimized.iterations,
    )
