"""Conditional-embedding VAEs (papers/003 §3.2): one VAE per target class over the editing prompt's
embedding, as a `TrainTask` for `pipeline.training.ray_train`.

On every worker `setup` loads the base model, the CLIP model and the perceptual distance, renders the
training scenes (shapes world; scenes already of the class are skipped), inverts them with the base
model and edits each towards its caption with the class word swapped in (Prompt-to-Prompt word swap).
It keeps the edit's latents x_T..x_0: the paper's cheap scheme. Iteration i draws `batch` images and one
sampling step with a generator seeded by (seed, i); the worker's share of them gets K samples C''_t, one
UNet call each, x0_hat decoded, and eq. 4's loss (`pipeline.methods.cond_vae.training_loss`).

T, the CLIP text side of eq. 2, is the class word in `templates`, embedded and averaged (`text:
templates`, the paper's single-text setting), or each training image's own target caption (`text:
captions`: the caption's other words, colour and background, then pull the samples too); the oracle is
never used here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from pipeline.diffusion.precision import fixed_branch_noise
from pipeline.methods import cond_vae
from pipeline.methods.null_text_vae import cyclical_beta
from pipeline.training.artefact import COND_VAE_KIND
from pipeline.training.diffusion_clip import (
    ClipSpec,
    WorldData,
    _at_resolution,
    differentiable_decode,
    load_task_models,
    world_training_texts,
)
from pipeline.training.ray_train import VAETaskState

KIND = COND_VAE_KIND
DEFAULT_TEMPLATES = ("a {}", "a photo of a {}", "an image of a {}", "a picture of a {}", "a drawing of a {}")


@dataclass(frozen=True)
class CondVAEConfig:
    """One conditional-embedding VAE's training (papers/003 §3.2, eqs. 2-4).

    The paper gives the losses and the cheap scheme but no sizes or weights; these are inversa's.

    Attributes:
        model: the base model (diffusers folder or hub id).
        clip: the CLIP model of eq. 2.
        perceptual: eq. 3's perceptual distance backbone ("lpips-alex", "features:<name>").
        feature_extractor: factory of the extractor of a "features:<name>" backbone, or None.
        data: the training images and the target class (data.value).
        text: T of eq. 2: templates (the class word in `templates`, averaged: the paper's single-text
            setting) or captions (each training image's target caption).
        class_word: the word the templates embed; None = data.value.
        templates: prompt templates averaged into T ("{}" is the class word).
        inversion: the inversion method of the kept edits (a registered method name).
        steps: sampling steps S of the kept edits (the job's num_steps).
        guidance_scale: w of the kept edits and of training (the job's guidance_scale).
        cross_replace_steps: the kept edits' P2P tau_c.
        self_replace_steps: the kept edits' P2P tau_s.
        samples: K samples per image and iteration (>= 2 for eq. 3).
        latent_dim: Z.
        reduced_channels: channels per token after the 1x1 reduction.
        hidden_dim: width of the hidden layers.
        lr: Adam learning rate of the VAE.
        alpha: eq. 4's weight of L_CLIP.
        beta: eq. 4's largest weight of L_reg (cyclical annealing, as eq. 1).
        gamma: eq. 4's weight of L_div (<= 0).
        kl_cycle: iterations per annealing cycle (beta restarts from 0 at each).
        kl_ramp: fraction of each cycle over which beta rises linearly from 0.
        batch: images per iteration over all workers (a multiple of the worker count).
        seed: seeds the VAE's initial weights and every iteration's draws.
    """

    model: str = "pipeline/world/assets/shapes-sd"
    clip: ClipSpec = dataclasses.field(default_factory=ClipSpec)
    perceptual: str = "features:shapes-oracle"
    feature_extractor: str | None = "pipeline.world.oracle:perceptual_features"
    data: WorldData = dataclasses.field(default_factory=WorldData)
    text: Literal["templates", "captions"] = "templates"
    class_word: str | None = None
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    inversion: str = "direct"
    steps: int = 20
    guidance_scale: float = 5.0
    cross_replace_steps: float = 0.8
    self_replace_steps: float = 0.4
    samples: int = 4
    latent_dim: int = 16
    reduced_channels: int = 4
    hidden_dim: int = 256
    lr: float = 1e-3
    alpha: float = 1.0
    beta: float = 1e-4
    gamma: float = -0.1
    kl_cycle: int = 100
    kl_ramp: float = 0.5
    batch: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.samples < 2:
            raise ValueError(f"samples={self.samples}: eq. 3 compares samples, give at least 2")
        if self.gamma > 0:
            raise ValueError(f"gamma={self.gamma}: eq. 4 needs gamma <= 0 (the diversity term is rewarded)")
        if any("{}" not in template for template in self.templates) or not self.templates:
            raise ValueError("templates: give at least one, each with '{}' where the class word goes")
        if min(self.steps, self.latent_dim, self.reduced_channels, self.hidden_dim, self.kl_cycle) < 1:
            raise ValueError(
                "steps, latent_dim, reduced_channels, hidden_dim and kl_cycle must be at least 1"
            )

    @property
    def sizes(self) -> cond_vae.VAESizes:
        return cond_vae.VAESizes(self.latent_dim, self.reduced_channels, self.hidden_dim)

    def with_absolute_paths(self, base: Path) -> CondVAEConfig:
        """Relative local paths (model, CLIP files) made absolute against `base`."""
        from pipeline.training.diffusion_clip import _absolute_paths

        return _absolute_paths(self, base)


def config_from_mapping(mapping: dict[str, Any]) -> CondVAEConfig:
    """The config from its JSON form (nested dataclasses and tuples rebuilt)."""
    fields = dict(mapping)
    fields["clip"] = ClipSpec(**fields.get("clip", {}))
    fields["data"] = WorldData(**fields.get("data", {}))
    if "templates" in fields:
        fields["templates"] = tuple(fields["templates"])
    return CondVAEConfig(**fields)


class KeptLatents:
    """An inversion method's edit hook that also keeps every edit row's latent after each step."""

    def __init__(self, hook) -> None:
        self.hook = hook
        self.stochastic = hook.stochastic
        self.kept: dict[int, list[torch.Tensor]] = {}

    def __getattr__(self, name: str):
        return getattr(self.hook, name)

    def steer(self, latent: torch.Tensor, pivot: torch.Tensor, request) -> torch.Tensor:
        steered = self.hook.steer(latent, pivot, request)
        self.kept.setdefault(request.image_index, []).append(steered.detach().clone())
        return steered


def kept_edit_latents(
    model, images: np.ndarray, references: list[str], targets: list[str], config
) -> torch.Tensor:
    """x_T..x_0 of each image's deterministic P2P edit towards its target caption.

    Returns:
        (S + 1, N, C, h, w): index i is the latent at the start of sampling step i (0 = x_T, S = x_0).
    """
    from pipeline import engine
    from pipeline.diffusion.control import AttentionControl
    from pipeline.diffusion.editing import EditRequest
    from pipeline.methods import InversionConfig

    inversion_config = InversionConfig.of(
        config.inversion, num_steps=config.steps, guidance_scale=config.guidance_scale
    )
    control = AttentionControl(
        mode="replace",
        cross_replace_steps=config.cross_replace_steps,
        self_replace_steps=config.self_replace_steps,
    )
    chunks = []
    for start in range(0, len(images), 8):
        chunk = slice(start, start + 8)
        inversion = engine.invert(model, torch.as_tensor(images[chunk]), references[chunk], inversion_config)
        if any(error is not None for error in inversion.errors):
            raise RuntimeError(f"inversion of training images failed: {inversion.errors}")
        recorder = KeptLatents(inversion.latents.edit_hook)
        inversion.latents.edit_hook = recorder
        requests = [EditRequest(index, target, control) for index, target in enumerate(targets[chunk])]
        results = engine.edit(model, inversion, requests)
        failed = [result.error for result in results if result.error is not None]
        if failed:
            raise RuntimeError(f"the kept edits of the training images failed: {failed[0]}")
        start_latents = inversion.latents.trajectory[-1]
        chunks.append(
            torch.stack(
                [torch.stack([start_latents[i], *recorder.kept[i]]) for i in range(len(requests))], dim=1
            )
        )
    return torch.cat(chunks, dim=1)


class CondVAETask(VAETaskState):
    """The TrainTask of one conditional-embedding VAE (see the module docstring)."""

    kind = KIND

    def __init__(self, config: CondVAEConfig) -> None:
        self.config = config

    def setup(self, device: torch.device, rank: int, world_size: int) -> None:
        config = self.config
        load_task_models(self, device, rank, world_size, frozen=True)
        self.distance = self._perceptual(device)
        self._prepare_edits()
        generator = torch.Generator().manual_seed(config.seed)
        tokens, channels = self.prompt_embeddings.shape[1:]
        self.vae = cond_vae.ConditionalEmbeddingVAE(tokens, channels, config.sizes, generator).to(device)
        self.optimizer = torch.optim.Adam(self.vae.parameters(), lr=config.lr)

    def _perceptual(self, device: torch.device):
        from pipeline.factories import load_factory
        from pipeline.metrics.perceptual import build_perceptual

        extractor = load_factory(self.config.feature_extractor)() if self.config.feature_extractor else None
        return build_perceptual(self.config.perceptual, device, feature_extractor=extractor)

    def _prepare_edits(self) -> None:
        """Kept edit latents, C' of every image, the fixed unconditional embedding, T and the schedule."""
        from pipeline.diffusion.ddim import DDIMSchedule
        from pipeline.diffusion.tokens import encode_prompts

        config, model = self.config, self.model
        images, references, targets = world_training_texts(config.data)
        images = _at_resolution(images, model.image_size)
        self.kept = kept_edit_latents(model, images, references, targets, config)
        with torch.no_grad():
            self.prompt_embeddings = encode_prompts(model.tokenizer, model.text_encoder, targets)
            self.uncond_embedding = encode_prompts(model.tokenizer, model.text_encoder, [""])
            if config.text == "captions":  # (N, E): one T per training image
                self.class_text = self.clip.text_embeddings(targets)
            else:
                word = config.class_word or config.data.value
                texts = [template.format(word) for template in config.templates]
                self.class_text = torch.nn.functional.normalize(
                    self.clip.text_embeddings(texts).mean(dim=0), dim=-1
                )
        self.schedule = DDIMSchedule.from_scheduler(model.scheduler, config.steps)

    def draws(self, iteration: int) -> tuple[np.ndarray, int]:
        """This worker's rows and the sampling step of iteration `iteration` (both from (seed, iteration))."""
        generator = np.random.default_rng([self.config.seed, iteration])
        batch = generator.choice(self.kept.shape[1], size=self.config.batch, replace=False)
        step_index = int(generator.integers(self.config.steps))
        return batch[self.rank :: self.world_size], step_index

    def batch(self, iteration: int) -> tuple[cond_vae.TrainingBatch, torch.Generator]:
        """This worker's TrainingBatch of iteration `iteration` and the generator of its derangements."""
        config = self.config
        rows, step_index = self.draws(iteration)
        rows = torch.as_tensor(rows)
        timestep = int(self.schedule.timesteps[step_index])
        latents = self.kept[step_index, rows]
        uncond = self.uncond_embedding.expand(len(rows), -1, -1)
        with torch.no_grad():
            uncond_noise = fixed_branch_noise(self.model.unet, latents, timestep, uncond)
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + iteration * 1009 + self.rank)
        noise = torch.randn(len(rows) * config.samples, config.latent_dim, generator=generator)
        return cond_vae.TrainingBatch(
            kept_latents=latents,
            timestep=timestep,
            alpha_bar=self.schedule.alpha_bar(timestep),
            prompt_embeddings=self.prompt_embeddings[rows],
            uncond_noise=uncond_noise,
            guidance_scale=config.guidance_scale,
            class_text=self.class_text[rows] if self.class_text.ndim == 2 else self.class_text,
            noise=noise.to(latents.device),
            samples=config.samples,
        ), generator

    def step(self, iteration: int, sync) -> dict[str, float]:
        config = self.config
        batch, generator = self.batch(iteration)
        # One cycle of `kl_cycle` iterations, repeated: the schedule does not depend on the run's length.
        beta = cyclical_beta(iteration, config.kl_cycle, config.beta, 1, config.kl_ramp)
        weights = cond_vae.LossWeights(alpha=config.alpha, beta=beta, gamma=config.gamma)
        loss, terms = cond_vae.training_loss(
            self.model.unet,
            self.vae,
            batch,
            lambda latents: differentiable_decode(self.model.vae, latents),
            self.clip.differentiable_image_embeddings,
            self.distance,
            weights,
            generator,
        )
        self.optimizer.zero_grad()
        loss.backward()
        sync()
        self.optimizer.step()
        return {"loss": float(loss.detach()), "beta": beta, **terms}

    def artefact(self) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
        tokens, channels = self.prompt_embeddings.shape[1:]
        config = dataclasses.asdict(self.config) | {"tokens": int(tokens), "channels": int(channels)}
        return self.vae_weights(), config, self.base_fingerprint


def build_task(mapping: dict[str, Any]) -> CondVAETask:
    """The factory `ray_train` calls on every worker."""
    return CondVAETask(config_from_mapping(mapping))
