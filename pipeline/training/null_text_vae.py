"""A dataset-wide null-text VAE (papers/003 §3.1, the amortised option): one VAE over the null-text
embeddings of many images, as a `TrainTask` for `pipeline.training.ray_train`.

On every worker `setup` loads the base model, reads the training images (WebDataset shards with
captions, or shapes-world scenes rendered from seeds) and inverts them with null-text inversion at the
job's settings (steps, w, N), keeping each image's pivots z*_0..z*_T, its phi_t and its prompt
embedding C. Iteration i draws `batch` images with a generator seeded by (seed, i) and walks their
sampling steps from z*_T along the VAE's own sampled path, one Adam step per sampling step with eq. 1's
loss (`pipeline.methods.null_text_vae.step_losses`): what the per-image VAE does for one image
(`training_path: sampled`), shared by all of them. The worker's share of the batch is rows r, r + W, ...
of it; `sync` averages the gradients before every Adam step.

Jobs sample from the artefact with `inversion: {method: null_text_vae, vae: URI}`: each image is still
inverted with null-text, but no VAE is trained per image.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.diffusion.precision import fixed_branch_noise
from pipeline.methods import null_text_vae
from pipeline.training.artefact import NULL_TEXT_VAE_KIND
from pipeline.training.ray_train import VAETaskState

KIND = NULL_TEXT_VAE_KIND
INVERSION_CHUNK = 8  # images per null-text inversion call while preparing


@dataclass(frozen=True)
class NullTextVAEData:
    """The training images.

    Attributes:
        shards: WebDataset shards (URLs, globs or brace ranges) of images with captions; empty: shapes-
            world scenes rendered from seeds `first_seed`, `first_seed` + 1, ...
        image: extensions tried in order for a sample's image member.
        caption: extension of its caption member (the prompt the image is inverted with).
        images: how many images (the first readable ones of the shards, in order).
        first_seed: the first shapes-world scene's seed (the sample shards start at 2,000,000).
    """

    shards: tuple[str, ...] = ()
    image: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
    caption: str = "txt"
    images: int = 64
    first_seed: int = 0


@dataclass(frozen=True)
class NullTextVAEConfig:
    """One dataset-wide null-text VAE's training (papers/003 §3.1, eq. 1 with cyclical annealing).

    The null-text settings must be the job's: the VAE learns the phi_t that null-text inversion gives
    at these steps, w and N (`inversa validate` refuses a job that inverts otherwise).

    Attributes:
        model: the base model (diffusers folder or hub id).
        data: the training images.
        steps: sampling steps S (the job's num_steps).
        guidance_scale: w (the job's guidance_scale).
        inner_steps: null-text's N (the job's inner_steps).
        learning_rate: null-text's base Adam lr.
        early_stop_epsilon: null-text's epsilon.
        latent_dim: Z.
        reduced_channels: channels per token after the 1x1 reduction.
        hidden_dim: width of the hidden layers.
        lr: Adam learning rate of the VAE.
        alpha: eq. 1's weight of L_rec.
        beta: eq. 1's largest weight of L_reg.
        kl_cycle: Adam steps per annealing cycle (beta restarts from 0 at each).
        kl_ramp: fraction of each cycle over which beta rises linearly from 0.
        batch: images per iteration over all workers (a multiple of the worker count).
        seed: seeds the VAE's initial weights and every iteration's draws.
    """

    model: str = "pipeline/world/assets/shapes-sd"
    data: NullTextVAEData = dataclasses.field(default_factory=NullTextVAEData)
    steps: int = 20
    guidance_scale: float = 5.0
    inner_steps: int = 5
    learning_rate: float = 1e-2
    early_stop_epsilon: float = 1e-5
    latent_dim: int = 16
    reduced_channels: int = 4
    hidden_dim: int = 256
    lr: float = 1e-3
    alpha: float = 1.0
    beta: float = 1e-5
    kl_cycle: int = 200
    kl_ramp: float = 0.5
    batch: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        sizes = (self.steps, self.inner_steps, self.latent_dim, self.reduced_channels, self.hidden_dim)
        if min(*sizes, self.kl_cycle, self.batch) < 1:
            raise ValueError(
                "steps, inner_steps, latent_dim, reduced_channels, hidden_dim, kl_cycle and batch must be at least 1"
            )
        if self.batch > self.data.images:
            raise ValueError(f"batch={self.batch} is more than data.images={self.data.images}")

    def with_absolute_paths(self, base: Path) -> NullTextVAEConfig:
        """Relative local paths (model, shards) made absolute against `base`."""

        def resolved(value: str) -> str:
            if "://" in value or Path(value).is_absolute():
                return value
            return str((base / value).resolve()) if (base / value).exists() or "{" in value else value

        data = dataclasses.replace(self.data, shards=tuple(resolved(shard) for shard in self.data.shards))
        return dataclasses.replace(self, model=resolved(self.model), data=data)

    def inversion_settings(self) -> dict[str, Any]:
        """The null-text settings a job must invert with to sample from this VAE."""
        return {
            "num_steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "inner_steps": self.inner_steps,
            "learning_rate": self.learning_rate,
            "early_stop_epsilon": self.early_stop_epsilon,
        }


def config_from_mapping(mapping: dict[str, Any]) -> NullTextVAEConfig:
    """The config from its JSON form (nested dataclasses and tuples rebuilt)."""
    fields = dict(mapping)
    data = dict(fields.get("data", {}))
    for key in ("shards", "image"):
        if key in data:
            data[key] = tuple(data[key])
    fields["data"] = NullTextVAEData(**data)
    return NullTextVAEConfig(**fields)


def training_images(data: NullTextVAEData, size: int) -> tuple[np.ndarray, list[str], int]:
    """The first `data.images` readable images (uint8 (N, size, size, 3)), their captions, and how many
    samples before them were skipped (no image or caption member, undecodable, empty caption).

    Raises:
        ValueError: the shards hold fewer readable samples than `data.images`.
    """
    if not data.shards:
        from pipeline.training.diffusion_clip import _at_resolution
        from pipeline.world import generator

        scenes = [generator.render(generator.sample_scene(data.first_seed + i)) for i in range(data.images)]
        images = np.stack([scene.image for scene in scenes])
        return _at_resolution(images, size), [scene.caption for scene in scenes], 0
    import fsspec

    from pipeline.stages.preprocess import resize_center_crop
    from pipeline.stages.read import SampleError, decode_image, expand_shards, iter_tar_samples

    images, captions, unreadable = [], [], 0
    for shard in expand_shards(list(data.shards)):
        with fsspec.open(shard, "rb") as stream:
            for key, members in iter_tar_samples(stream):
                extension = next((ext for ext in data.image if ext in members), None)
                try:
                    if extension is None or data.caption not in members:
                        raise SampleError("MissingField", key)
                    caption = members[data.caption].decode("utf-8").strip()
                    if not caption:
                        raise SampleError("MissingField", key)
                    image = decode_image(members[extension], f"{key}.{extension}")
                except (SampleError, UnicodeDecodeError):
                    unreadable += 1
                    continue
                images.append(resize_center_crop(image, size))
                captions.append(caption)
                if len(images) == data.images:
                    return np.stack(images), captions, unreadable
    raise ValueError(
        f"data.shards hold {len(images)} readable images with captions ({unreadable} unreadable), "
        f"fewer than data.images={data.images}; add shards or lower data.images"
    )


class NullTextVAETask(VAETaskState):
    """The TrainTask of one dataset-wide null-text VAE (see the module docstring)."""

    kind = KIND

    def __init__(self, config: NullTextVAEConfig) -> None:
        self.config = config

    def setup(self, device: torch.device, rank: int, world_size: int) -> None:
        from pipeline.training.diffusion_clip import load_base_model

        config = self.config
        load_base_model(self, device, rank, world_size, frozen=True)
        self._invert_training_images()
        tokens, channels = self.null_text.shape[2:]
        generator = torch.Generator().manual_seed(config.seed)
        self.vae = null_text_vae.EmbeddingVAE(
            1, tokens, channels, config, torch.zeros(1, tokens, channels), generator, add_input=True
        ).to(device)
        self.optimizer = torch.optim.Adam(self.vae.parameters(), lr=config.lr)

    def _invert_training_images(self) -> None:
        """Null-text inversion of every training image: pivots, phi_t, C and the schedule."""
        from pipeline import engine
        from pipeline.methods import InversionConfig

        config, model = self.config, self.model
        images, captions, self.unreadable = training_images(config.data, model.image_size)
        inversion_config = InversionConfig.of("null_text", **config.inversion_settings())
        trajectories, null_texts, conds = [], [], []
        for start in range(0, len(images), INVERSION_CHUNK):
            chunk = slice(start, start + INVERSION_CHUNK)
            inversion = engine.invert(
                model, torch.as_tensor(images[chunk]), captions[chunk], inversion_config
            )
            failed = [error for error in inversion.errors if error is not None]
            if failed:
                raise RuntimeError(f"null-text inversion of a training image failed: {failed[0]}")
            trajectories.append(inversion.latents.trajectory)
            null_texts.append(inversion.latents.uncond_embeddings)
            conds.append(inversion.latents.cond_embeddings[0])
        self.trajectory = torch.cat(trajectories, dim=1)  # (S+1, N, C, h, w) z*_0..z*_T
        self.null_text = torch.cat(null_texts, dim=1)  # (S, N, L, D) phi_t
        self.cond_embeddings = torch.cat(conds)  # (N, L, D) C
        self.schedule = inversion.schedule

    def draws(self, iteration: int) -> tuple[np.ndarray, torch.Tensor]:
        """This worker's images of iteration `iteration` and their latent noise, (S, rows, Z), both
        drawn from (seed, iteration) so that the split over workers does not change them."""
        config = self.config
        rng = np.random.default_rng([config.seed, iteration])
        batch = rng.choice(self.trajectory.shape[1], size=config.batch, replace=False)
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + iteration)
        noise = torch.randn(config.steps, config.batch, config.latent_dim, generator=generator)
        mine = slice(self.rank, None, self.world_size)
        return batch[mine], noise[:, mine]

    def step(self, iteration: int, sync) -> dict[str, float]:
        config, unet, schedule = self.config, self.model.unet, self.schedule
        rows, noise = self.draws(iteration)
        rows = torch.as_tensor(rows)
        device = self.trajectory.device
        vae_rows = torch.zeros(len(rows), dtype=torch.long, device=device)
        cond_embeddings = self.cond_embeddings[rows]
        latents = self.trajectory[-1, rows]
        totals = {"loss": 0.0, "reconstruction": 0.0, "kl": 0.0, "beta": 0.0}
        for step_index, timestep in enumerate(schedule.timesteps.tolist()):
            adam_step = iteration * config.steps + step_index
            # One cycle of `kl_cycle` Adam steps, repeated: the schedule does not depend on the run's length.
            beta = null_text_vae.cyclical_beta(adam_step, config.kl_cycle, config.beta, 1, config.kl_ramp)
            with torch.no_grad():
                cond_noise = fixed_branch_noise(unet, latents, timestep, cond_embeddings)
            landed, mu, logvar = null_text_vae.sampled_null_text_step(
                unet,
                schedule,
                self.vae,
                latents,
                timestep,
                self.null_text[step_index, rows],
                vae_rows,
                noise[step_index].to(device),
                cond_noise,
                config.guidance_scale,
            )
            pivot = self.trajectory[config.steps - step_index - 1, rows]
            losses, reconstruction, kl = null_text_vae.step_losses(
                landed, pivot, mu, logvar, config.alpha, beta
            )
            loss = losses.mean()
            self.optimizer.zero_grad()
            loss.backward()
            sync()
            self.optimizer.step()
            latents = landed.detach()
            for name, value in (("loss", loss), ("reconstruction", reconstruction.mean()), ("kl", kl.mean())):
                totals[name] += float(value.detach()) / config.steps
            totals["beta"] += beta / config.steps
        return totals

    def artefact(self) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
        tokens, channels = self.null_text.shape[2:]
        config = dataclasses.asdict(self.config) | {
            "tokens": int(tokens),
            "channels": int(channels),
            "training_images": int(self.trajectory.shape[1]),
            "skipped_samples": self.unreadable,
        }
        return self.vae_weights(), config, self.base_fingerprint


def build_task(mapping: dict[str, Any]) -> NullTextVAETask:
    """The factory `ray_train` calls on every worker."""
    return NullTextVAETask(config_from_mapping(mapping))
