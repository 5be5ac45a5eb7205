"""L_prior for trained editors (DiffusionCLIP editors, ZIP encoders): its config and its draws.

Not in either paper. The frozen original model scores the edit's latent once per iteration
(`pipeline.methods.diffusion_clip.prior_loss`): score distillation (form sds) or Delta Denoising Score
(form delta), conditioned on the editor's prompt or on each training image's target caption, with
optional classifier-free guidance. The draw (t, eps) comes from (seed, iteration) for the whole batch and
each worker takes its rows' share, so every worker count sees the same draw.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from pipeline.diffusion.precision import fixed_branch_noise
from pipeline.methods import diffusion_clip as dc

# t is drawn from [PRIOR_FIRST_STEP, t0]: below it the noised latent is the latent itself.
PRIOR_FIRST_STEP = 20


@dataclass(frozen=True)
class PriorConfig:
    """L_prior of an editor's training (0 weight = off, the papers' losses).

    Attributes:
        weight: lambda_prior.
        condition: prompt (the editor's `prompt`) or texts (each image's y_tar, and its y_ref on the source
            side of the delta form, encoded by the base model's text encoder).
        guidance: classifier-free guidance w of the conditions against "" (1 = none).
        form: sds (score distillation: the residual's baseline is the drawn eps) or delta (Delta Denoising
            Score: the baseline is the frozen model's noise on the source latent noised alike, at y_ref).
    """

    weight: float = 0.0
    condition: Literal["prompt", "texts"] = "prompt"
    guidance: float = 1.0
    form: Literal["sds", "delta"] = "sds"

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"prior.weight={self.weight} must be >= 0 (0 = no prior)")
        if self.guidance < 0:
            raise ValueError(f"prior.guidance={self.guidance} must be >= 0 (1 = no guidance)")
        if (self.condition, self.guidance, self.form) != ("prompt", 1.0, "sds") and not self.weight:
            raise ValueError(
                "prior.condition, prior.guidance and prior.form shape L_prior: set prior.weight > 0"
            )


@dataclass(frozen=True)
class PriorSources:
    """What the draws read of the training set.

    Attributes:
        latents: the training images' latents zs, (N, C, h, w).
        references: each image's y_ref.
        targets: each image's y_tar.
    """

    latents: torch.Tensor
    references: list[str]
    targets: list[str]


class PriorDraws:
    """L_prior's draw per (iteration, rows) for one worker of a training task.

    Args:
        config: the prior.
        model: the base model (tokenizer, text encoder, scheduler).
        frozen_unet: the original UNet, never trained (a copy where the task trains the model's own).
        prompt_condition: the editor's prompt's embeddings, (1, L, D).
        sources: the training images' latents and texts.
        seed, batch, return_step: the task's seed, pairs per iteration over all workers, and t0.
        rank, world_size: this worker's share of each batch.
    """

    def __init__(
        self,
        config: PriorConfig,
        model,
        frozen_unet: torch.nn.Module,
        prompt_condition: torch.Tensor,
        sources: PriorSources,
        seed: int,
        batch: int,
        return_step: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        from pipeline.diffusion.tokens import encode_prompts

        self.config, self.unet, self.sources = config, frozen_unet, sources
        self.seed, self.batch, self.return_step = seed, batch, return_step
        self.rank, self.world_size = rank, world_size
        self.alphas = model.scheduler.alphas_cumprod

        def encode(texts: list[str]) -> torch.Tensor:
            return encode_prompts(model.tokenizer, model.text_encoder, texts)

        self.none = encode([""])
        self.prompt = prompt_condition
        texts = config.condition == "texts"
        self.targets = encode(sources.targets) if texts else None
        self.references = encode(sources.references) if texts and config.form == "delta" else None

    def noise_at(self, condition: torch.Tensor) -> dc.NoiseFn:
        """eps~ of the frozen model at `condition` ((1 or B, L, D)), guided against "" by w."""

        def at(embeddings: torch.Tensor) -> dc.NoiseFn:
            def noise(latents: torch.Tensor, timestep: int) -> torch.Tensor:
                expanded = embeddings.expand(latents.shape[0], -1, -1)
                return fixed_branch_noise(self.unet, latents, timestep, expanded)

            return noise

        return dc.guided(at(condition), at(self.none), self.config.guidance)

    def term(self, iteration: int, rows: torch.Tensor) -> dc.PriorTerm:
        """The draw of `iteration` for this worker's `rows` (indices into the training set)."""
        generator = np.random.default_rng([self.seed, iteration, 1])
        timestep = int(generator.integers(PRIOR_FIRST_STEP, self.return_step + 1))
        shape = (self.batch, *self.sources.latents.shape[1:])
        noise = torch.as_tensor(generator.standard_normal(shape), dtype=torch.float32)
        target = self.prompt if self.targets is None else self.targets[rows]
        reference = None
        if self.config.form == "delta":
            source_condition = self.prompt if self.references is None else self.references[rows]
            reference = dc.PriorReference(self.noise_at(source_condition), self.sources.latents[rows])
        return dc.PriorTerm(
            noise_fn=self.noise_at(target),
            timestep=timestep,
            alpha=float(self.alphas[timestep]),
            noise=noise[self.rank :: self.world_size].to(self.sources.latents),
            weight=self.config.weight,
            reference=reference,
        )
