"""The shapes world's training data and output layout: scenes rendered from seeds, cached once.

Every shapes-world stage trains on `training_scenes` (seeds 0..N-1, held-out captions excluded) and
scores on `heldout_scenes` (seeds from HELDOUT_SEED_OFFSET).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.training.world_config import TrainConfig
from pipeline.world import broad, generator
from pipeline.world.oracle import HEADS

SD_FOLDER_NAME = "shapes-sd"  # the diffusers folder the unet stage writes under OUTPUT
HELDOUT_SEED_OFFSET = 1_000_000  # held-out scenes use seeds disjoint from the training seeds
BROAD_HELDOUT_SEED_OFFSET = 2_000_000  # held-out off-palette scenes; training seeds count up from 0
SCENE_CACHE_VERSION = 2  # bump when SceneSet gains fields, so stale caches are re-rendered


@dataclass
class SceneSet:
    """Rendered scenes.

    Attributes:
        images: uint8 (N, 64, 64, 3).
        captions: N captions.
        labels: per oracle head, the index of each scene's value, (N,).
        n_objects: (N,) objects per scene.
        object_masks: bool (N, 64, 64), the union of the objects' silhouettes.
    """

    images: np.ndarray
    captions: list[str]
    labels: dict[str, np.ndarray]
    n_objects: np.ndarray
    object_masks: np.ndarray

    def head(self, count: int) -> SceneSet:
        """The first `count` scenes."""
        return SceneSet(
            self.images[:count],
            self.captions[:count],
            {name: values[:count] for name, values in self.labels.items()},
            self.n_objects[:count],
            self.object_masks[:count],
        )


def render_scenes(
    seeds: range, two_object_fraction: float, exclude: frozenset[str] = frozenset()
) -> SceneSet:
    """Render one scene per seed.

    Args:
        seeds: one scene per seed, in order.
        two_object_fraction: probability of a two-object scene.
        exclude: captions never rendered (their seeds draw another scene).
    """
    rendered = [
        generator.render(generator.sample_scene(seed, two_object_fraction, exclude_captions=exclude))
        for seed in seeds
    ]
    labels = {
        name: np.array([values.index(r.attributes[name]) for r in rendered]) for name, values in HEADS.items()
    }
    return SceneSet(
        images=np.stack([r.image for r in rendered]),
        captions=[r.caption for r in rendered],
        labels=labels,
        n_objects=np.array([r.attributes["n_objects"] for r in rendered]),
        object_masks=np.stack([r.masks.any(axis=0) for r in rendered]),
    )


def training_scenes(config: TrainConfig) -> SceneSet:
    """The training scenes, rendered once and cached under `cache_dir` (keyed by the data config)."""
    key = hashlib.sha256(repr((SCENE_CACHE_VERSION, config.data)).encode()).hexdigest()[:16]
    path = Path(config.cache_dir) / f"scenes_{key}.npz"
    if path.is_file():
        cached = np.load(path)
        labels = {name: cached[f"label_{name}"] for name in HEADS}
        return SceneSet(
            cached["images"], cached["captions"].tolist(), labels, cached["n_objects"], cached["object_masks"]
        )
    scenes = render_scenes(
        range(config.data.train_scenes),
        config.data.two_object_fraction,
        frozenset(config.data.heldout_captions),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = {f"label_{name}": values for name, values in scenes.labels.items()}
    np.savez(path.with_suffix(".tmp.npz"), images=scenes.images, captions=np.array(scenes.captions),
             n_objects=scenes.n_objects, object_masks=scenes.object_masks, **labels)  # fmt: skip
    path.with_suffix(".tmp.npz").replace(path)
    return scenes


def heldout_scenes(config: TrainConfig, two_object_fraction: float | None = None) -> SceneSet:
    """The held-out scenes (seeds HELDOUT_SEED_OFFSET onwards; held-out captions may appear).

    Args:
        config: the training job.
        two_object_fraction: overrides the data config's (0.0 for one-object scenes only).
    """
    fraction = config.data.two_object_fraction if two_object_fraction is None else two_object_fraction
    seeds = range(HELDOUT_SEED_OFFSET, HELDOUT_SEED_OFFSET + config.data.heldout_scenes)
    return render_scenes(seeds, fraction)


def shipped_vae_folder(config: TrainConfig) -> Path:
    """OUTPUT/shapes-sd/vae: the VAE that the unet stage ships with the diffusers folder."""
    return Path(config.output) / SD_FOLDER_NAME / "vae"


def off_palette_mix(
    rng: np.random.Generator,
    world: np.ndarray,
    batch: int,
    world_fraction: float,
    near_fraction: float,
    step: int,
    backgrounds: tuple[str, ...] = broad.BROAD_BACKGROUNDS,
    stage: str = "vae_broad",
) -> np.ndarray:
    """One batch of a VAE stage: world scenes, then near scenes, then broad scenes, uint8 (batch, 64, 64, 3).

    Off-palette scenes are fresh every step (seeds step * batch + i), never the held-out seeds.

    Args:
        rng: draws the world scenes.
        world: the world's training scenes, uint8 (N, 64, 64, 3).
        batch: scenes in the batch.
        world_fraction: share of world scenes.
        near_fraction: share of `broad.near_scene` scenes (the rest are `broad.broad_scene`).
        step: the training step (picks the off-palette seeds).
        backgrounds: the broad scenes' background kinds (`broad.broad_images`).
        stage: the config section named when the seeds would reach the held-out ones.

    Raises:
        ValueError: the step's seeds reach BROAD_HELDOUT_SEED_OFFSET.
    """
    n_world = round(batch * world_fraction)
    n_near = round(batch * near_fraction)
    first_seed = step * batch
    seeds = range(first_seed, first_seed + batch - n_world)
    if seeds.stop > BROAD_HELDOUT_SEED_OFFSET:
        raise ValueError(
            f"{stage} draws {seeds.stop} training seeds, into the held-out seeds from "
            f"{BROAD_HELDOUT_SEED_OFFSET}; lower {stage}.steps or {stage}.batch"
        )
    world_images = world[rng.choice(len(world), n_world)]
    near = broad.near_images(seeds[:n_near])
    far = broad.broad_images(seeds[n_near:], backgrounds)
    return np.concatenate([world_images, near, far])


def heldout_families(config: TrainConfig) -> dict[str, np.ndarray]:
    """The held-out sets VAE stages score, uint8 (N, 64, 64, 3) each: world, broad and near scenes.

    N is `vae_broad.heldout_scenes`; broad and near scenes use seeds from BROAD_HELDOUT_SEED_OFFSET.
    """
    count = config.vae_broad.heldout_scenes
    seeds = range(BROAD_HELDOUT_SEED_OFFSET, BROAD_HELDOUT_SEED_OFFSET + count)
    return {
        "world": heldout_scenes(config).images[:count],
        "broad": broad.broad_images(seeds),
        "near": broad.near_images(seeds),
    }
