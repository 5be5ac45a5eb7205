"""Stochastic conditional embeddings (Park et al., "Adding stochastic features in DDIM inversion based image
editing", §3.2): a VAE over the editing prompt's embedding whose samples C''_t each give a different
Prompt-to-Prompt edit of the same image, trained with a CLIP loss towards the target class.

Legend:

    C'_t            the editing prompt's conditional embedding at step t, (L, D) (the edit's c*)
    gamma(t)        sinusoidal embedding of the timestep t (`null_text_vae.timestep_embedding`)
    encoder         (C'_t, t) -> (mu_t, log sigma_t^2) in R^Z: null_text_vae's sequence-level MLP (a 1x1
                    reduction of every token's D channels, the flattened sequence next to gamma(t), one
                    hidden layer); the paper found token-level MLPs collapse texture
    u_t             mu_t + tau * sigma_t * eps_t, eps_t ~ N(0, I); tau is the sampling temperature
    C''_t           C'_t + D(u_t): the decoder's last layer starts at zero, so an untrained VAE edits
                    exactly as C' does, and every prompt (not only the trained one) can be sampled
    x_t             the kept latent at step t of the deterministic edit with C' (the paper's cheap
                    scheme: x_T..x_0 are sampled once with C', then each iteration calls the UNet once)
    eps             eps_u(x_t) + w (eps(x_t, t, C''_t) - eps_u(x_t)): classifier-free guidance, the
                    unconditional branch fixed (no gradient reaches it)
    x0_hat          (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t): DDIM's predicted x_0
    I''             DEC(x0_hat), the sampled edit's image; I' the deterministic edit's
    E_I, T          CLIP image encoder; T the target class's CLIP text embedding (prompt templates
                    averaged: the paper's single-text setting)
    D_CLIP(a, b)    1 - cos(a, b)
    L_CLIP          D_CLIP(E_I(I''), T)                                      (eq. 2 with lambda = 1)
    L_div           1/N sum_i d(I''_i, I''_{Q_i}), Q a derangement of each image's K samples and d a
                    perceptual distance (LPIPS: the paper's negative perceptual loss)           (eq. 3)
    L_reg           KL(N(mu_t, sigma_t^2) || N(0, I)), as eq. 1
    L_C'            alpha L_CLIP + beta_k L_reg + gamma L_div, gamma <= 0                     (eq. 4)

Eq. 2's second term, (1 - lambda) D_CLIP(E_I(I'), C''), compares an image with the sampled UNet
conditioning itself. That needs C'' in the image encoder's space, which SD 1.5 (its text encoder is not
the scoring CLIP's) and the shapes world do not give, and the paper's own ablation (§5) found the term
adversarial: its gradient reaches the VAE only, and the images turn unrealistic. inversa uses lambda = 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pipeline.diffusion.errors import EngineInputError
from pipeline.diffusion.precision import optimised_branch_noise
from pipeline.methods.diffusion_clip import predict_clean
from pipeline.methods.null_text_vae import EmbeddingVAE, kl_divergence


@dataclass(frozen=True)
class VAESizes:
    """Attributes: latent_dim (Z), reduced_channels (r of the 1x1 reduction), hidden_dim."""

    latent_dim: int = 16
    reduced_channels: int = 4
    hidden_dim: int = 256


class ConditionalEmbeddingVAE(EmbeddingVAE):
    """One VAE over (L, D) prompt embeddings; its decoder's output is added to the input C'_t.

    Args:
        tokens: L.
        channels: D.
        sizes: the latent, reduced and hidden sizes.
        generator: draws the initial weights.
    """

    def __init__(self, tokens: int, channels: int, sizes: VAESizes, generator: torch.Generator):
        # add_input False: sample_embeddings adds C'_t itself.
        super().__init__(
            1, tokens, channels, sizes, torch.zeros(1, tokens, channels), generator, add_input=False
        )

    @property
    def latent_dim(self) -> int:
        return self.mu_weight.shape[-1]

    def sample_embeddings(
        self,
        prompt_embeddings: torch.Tensor,
        timesteps: torch.Tensor,
        noise: torch.Tensor,
        temperature: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """C''_t = C'_t + D(mu_t + temperature * sigma_t * noise).

        Args:
            prompt_embeddings: (N, L, D) C'_t.
            timesteps: (N,) t.
            noise: (N, Z) eps_t.
            temperature: tau (0 = the mean decode).

        Returns:
            (N, L, D) C''_t, and mu, logvar, each (N, Z).
        """
        rows = torch.zeros(prompt_embeddings.shape[0], dtype=torch.long, device=prompt_embeddings.device)
        mu, logvar = self.encode(prompt_embeddings, timesteps, rows)
        latents = mu + temperature * torch.exp(0.5 * logvar) * noise
        # The base buffer is zero: decode returns D(u_t) alone, added to the input here.
        return prompt_embeddings + self.decode(latents, rows), mu, logvar

    def sample_sequence(
        self, prompt_embeddings: torch.Tensor, timesteps: torch.Tensor, seed: int, temperature: float
    ) -> torch.Tensor:
        """One edit's C''_1..C''_S, reproducible from `seed` (the noise is drawn on the CPU).

        Args:
            prompt_embeddings: (S, L, D) C'_t of every sampling step.
            timesteps: (S,) the sampling steps' timesteps.
            seed: the sample's seed.
            temperature: tau.

        Returns:
            (S, L, D) C''_t.
        """
        steps = prompt_embeddings.shape[0]
        noise = torch.randn(steps, self.latent_dim, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            sampled, _, _ = self.sample_embeddings(
                prompt_embeddings,
                timesteps.to(prompt_embeddings.device),
                noise.to(prompt_embeddings),
                temperature,
            )
        return sampled


def derangement(count: int, generator: torch.Generator) -> torch.Tensor:
    """A uniformly drawn permutation of range(count) with no fixed point (eq. 3's Q; P_i != Q_i).

    Rejection sampling: a random permutation is a derangement with probability about 1/e.
    """
    if count < 2:
        raise EngineInputError(f"a derangement needs at least 2 samples, got {count}")
    while True:
        permutation = torch.randperm(count, generator=generator)
        if not bool((permutation == torch.arange(count)).any()):
            return permutation


def group_derangement(groups: int, samples: int, generator: torch.Generator) -> torch.Tensor:
    """Q over rows laid out group-major (row = g * samples + k): each group's samples deranged among
    themselves, so L_div compares samples of the same source image only. Returns (groups * samples,)."""
    return torch.cat([g * samples + derangement(samples, generator) for g in range(groups)])


def clip_distance(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
    """D_CLIP = 1 - cos per row: (N, E) images, (N, E) or (E,) text -> (N,)."""
    return 1.0 - torch.nn.functional.cosine_similarity(
        image_embeddings, text_embeddings.expand_as(image_embeddings)
    )


def diversity_loss(
    images: torch.Tensor,
    permutation: torch.Tensor,
    distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Eq. 3: the mean perceptual distance between each sample I''_i and I''_{Q_i}.

    Args:
        images: (N, 3, H, W) in [0, 1].
        permutation: (N,) Q.
        distance: (N, 3, H, W) pairs -> (N,) distances.

    Returns:
        Scalar L_div (eq. 4 weighs it with gamma <= 0, so training pushes it up).
    """
    return distance(images, images[permutation]).mean()


@dataclass
class LossWeights:
    """Eq. 4's weights: alpha (L_CLIP), beta_k (L_reg, after annealing) and gamma (L_div, <= 0)."""

    alpha: float = 1.0
    beta: float = 1e-4
    gamma: float = -0.1


@dataclass
class TrainingBatch:
    """One iteration's inputs: B images at one step of their kept edit, K samples each.

    Attributes:
        kept_latents: (B, C, h, w) x_t of the deterministic edit with C'.
        timestep: t.
        alpha_bar: alpha_bar_t.
        prompt_embeddings: (B, L, D) C'_t.
        uncond_noise: (B, C, h, w) eps_u(x_t), the fixed unconditional branch.
        guidance_scale: w.
        class_text: T, the CLIP text embedding the samples are pulled to: (E,) the target class's, or
            (B, E) one per image (each image's own target caption).
        noise: (B * K, Z) eps_t, rows group-major (row = b * K + k).
        samples: K.
    """

    kept_latents: torch.Tensor
    timestep: int
    alpha_bar: float
    prompt_embeddings: torch.Tensor
    uncond_noise: torch.Tensor
    guidance_scale: float
    class_text: torch.Tensor
    noise: torch.Tensor
    samples: int


def sampled_predictions(
    unet: torch.nn.Module, vae: ConditionalEmbeddingVAE, batch: TrainingBatch
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x0_hat of every sample from one UNet call (with gradients to the VAE).

    Returns:
        (B K, C, h, w) x0_hat, and mu, logvar, each (B K, Z).
    """
    samples = batch.samples
    prompts = batch.prompt_embeddings.repeat_interleave(samples, dim=0)
    timesteps = torch.full((prompts.shape[0],), batch.timestep)
    sampled, mu, logvar = vae.sample_embeddings(prompts, timesteps, batch.noise)
    latents = batch.kept_latents.repeat_interleave(samples, dim=0)
    uncond = batch.uncond_noise.repeat_interleave(samples, dim=0)
    cond = optimised_branch_noise(unet, latents, batch.timestep, sampled)
    guided = uncond + batch.guidance_scale * (cond - uncond)
    return predict_clean(guided, latents, batch.alpha_bar), mu, logvar


def training_loss(
    unet: torch.nn.Module,
    vae: ConditionalEmbeddingVAE,
    batch: TrainingBatch,
    decode: Callable[[torch.Tensor], torch.Tensor],
    image_embeddings: Callable[[torch.Tensor], torch.Tensor],
    distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    weights: LossWeights,
    generator: torch.Generator,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Eq. 4 for one batch of the cheap scheme.

    Args:
        unet: the frozen noise predictor.
        vae: the trained VAE.
        batch: the iteration's inputs.
        decode: latents -> images in [-1, 1], (N, 3, H, W), differentiable.
        image_embeddings: images in [0, 1] -> (N, E) CLIP embeddings, differentiable.
        distance: perceptual distance of eq. 3, (N, 3, H, W) pairs in [0, 1] -> (N,).
        weights: alpha, beta_k, gamma.
        generator: draws the derangement.

    Returns:
        The loss and its terms (clip, kl, diversity) as floats.
    """
    if weights.gamma > 0:
        raise EngineInputError(f"eq. 4 needs gamma <= 0 (it rewards diversity), got {weights.gamma}")
    predicted, mu, logvar = sampled_predictions(unet, vae, batch)
    images = (decode(predicted) / 2 + 0.5).clamp(0, 1)
    text = batch.class_text
    if text.ndim == 2:  # one text per image: each of its K samples is compared with it
        text = text.repeat_interleave(batch.samples, dim=0)
    clip = clip_distance(image_embeddings(images), text).mean()
    kl = kl_divergence(mu, logvar).mean()
    groups = batch.kept_latents.shape[0]
    diversity = (
        diversity_loss(images, group_derangement(groups, batch.samples, generator), distance)
        if batch.samples > 1
        else images.new_zeros(())
    )
    loss = weights.alpha * clip + weights.beta * kl + weights.gamma * diversity
    terms = {"clip": clip, "kl": kl, "diversity": diversity}
    return loss, {name: float(value.detach()) for name, value in terms.items()}
