"""The shapes world's tiny open_clip models (`shapes-clip-vit-tiny`), trained contrastively.

The `clip` stage writes OUTPUT/shapes_clip.safetensors (the metric CLIP); the `clip-guide` stage writes
OUTPUT/shapes_clip_guide.safetensors, the same architecture trained longer with counterfactual hard
negatives (each chosen scene also enters the batch with one attribute changed, as NegCLIP adds
minimally changed captions) and resized positives (the object resized and moved under the same
caption), which trained editors' direction loss uses. The architecture is the
shipped open_clip config (`pipeline.world.clip_model`).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from pipeline.metrics.clip import register_model_config
from pipeline.training.loop import Budget, MetricsLog, optimize, seed_everything, training_device
from pipeline.training.world_config import ClipConfig, TrainConfig
from pipeline.training.world_data import SceneSet, heldout_scenes, training_scenes
from pipeline.world import generator
from pipeline.world.clip_model import (
    SHAPES_CLIP_GUIDE_WEIGHTS,
    SHAPES_CLIP_WEIGHTS,
    register_shapes_clip,
)

CLIP_SEED_OFFSET = 2


def train_clip(config: TrainConfig):
    """The `clip` stage: the metric CLIP, OUTPUT/shapes_clip.safetensors (see `train_contrastive`)."""
    return train_contrastive(config, config.clip, SHAPES_CLIP_WEIGHTS.name, "clip")


def train_clip_guide(config: TrainConfig):
    """The `clip-guide` stage: the guidance CLIP, OUTPUT/shapes_clip_guide.safetensors."""
    return train_contrastive(config, config.clip_guide, SHAPES_CLIP_GUIDE_WEIGHTS.name, "clip_guide")


def train_contrastive(config: TrainConfig, clip: ClipConfig, weights_name: str, record: str):
    """Train the tiny open_clip model contrastively; identical captions in a batch count as positives.

    Records top-1 caption retrieval on held-out one-object scenes.

    Args:
        config: the training job.
        clip: this stage's settings (`config.clip` or `config.clip_guide`).
        weights_name: the file written under OUTPUT.
        record: the stage's key in OUTPUT/train_metrics.json.

    Returns:
        The trained open_clip model, on the CPU in eval mode.
    """
    rng = seed_everything(config.seed + CLIP_SEED_OFFSET)
    data = training_scenes(config)
    architecture = clip_architecture(clip)
    device = training_device()
    model, _, _ = open_clip.create_model_and_transforms(architecture, device=device)
    tokenizer = open_clip.get_tokenizer(architecture)
    tokens = tokenizer(data.captions)
    normalize = clip_normalizer(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=clip.lr, weight_decay=0.05)

    excluded = frozenset(config.data.heldout_captions)
    hard_negatives = round(clip.counterfactual_fraction * clip.batch)
    resized = round(clip.resized_fraction * clip.batch)
    wobbly = round(clip.wobbly_fraction * clip.batch)

    def loss_step() -> torch.Tensor:
        index = rng.choice(len(data.images), clip.batch, replace=False)
        images, batch_tokens, batch_captions = (
            data.images[index],
            tokens[torch.as_tensor(index)],
            [data.captions[i] for i in index],
        )
        if hard_negatives:
            # Training scene i is seed i's scene (`training_scenes`), so it can be re-drawn and edited.
            edited_images, edited_captions = counterfactual_scenes(
                index[:hard_negatives].tolist(), config.data.two_object_fraction, excluded, rng
            )
            images = np.concatenate([images, edited_images])
            batch_tokens = torch.cat([batch_tokens, tokenizer(edited_captions)])
            batch_captions = batch_captions + edited_captions
        if resized:
            chosen = index[clip.batch - resized :].tolist()
            images = np.concatenate(
                [images, resized_scenes(chosen, config.data.two_object_fraction, excluded, rng)]
            )
            batch_tokens = torch.cat([batch_tokens, tokens[torch.as_tensor(chosen)]])
            batch_captions = batch_captions + [data.captions[i] for i in chosen]
        if wobbly:  # drawn after the others, so that runs without them keep their random draws
            chosen = index[:wobbly].tolist()
            images = np.concatenate(
                [images, wobbly_scenes(chosen, config.data.two_object_fraction, excluded, rng)]
            )
            batch_tokens = torch.cat([batch_tokens, tokens[torch.as_tensor(chosen)]])
            batch_captions = batch_captions + [data.captions[i] for i in chosen]
        image_features, text_features, logit_scale = model(
            normalize(images).to(device), batch_tokens.to(device)
        )[:3]
        return contrastive_loss(logit_scale * image_features @ text_features.T, batch_captions)

    budget = Budget(clip.steps, clip.max_minutes)
    model.train()
    optimize(loss_step, optimizer, budget, stage=record, peak_lr=clip.lr)
    model.cpu().eval()
    stored = {
        key: value.to(getattr(torch, clip.save_dtype)).contiguous()
        for key, value in model.state_dict().items()
    }
    # Measured on the weights as stored: a float16 file loads into float32 with its rounding.
    model.load_state_dict(stored)
    accuracy = clip_caption_accuracy(model, tokenizer, heldout_scenes(config, two_object_fraction=0.0))
    if clip.output_name is not None:
        weights_name, record = f"{clip.output_name}.safetensors", clip.output_name
    weights = Path(config.output) / weights_name
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_file(stored, weights)
    MetricsLog(config.output).record(
        record,
        {"steps": budget.step, "wall_s": round(budget.elapsed), "counterfactual_fraction": clip.counterfactual_fraction,
         "resized_fraction": clip.resized_fraction, "wobbly_fraction": clip.wobbly_fraction,
         "architecture": architecture, "save_dtype": clip.save_dtype, **accuracy},
    )  # fmt: skip
    return model


def clip_architecture(clip: ClipConfig) -> str:
    """Register the stage's open_clip architecture and return its name (the shipped one by default)."""
    if clip.architecture is None:
        return register_shapes_clip()
    return register_model_config(clip.architecture)


def contrastive_loss(logits: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """Symmetric InfoNCE where every image and text of the same caption count as positives.

    Args:
        logits: (N, N) scaled image-text similarities, image i against text j.
        captions: the N captions (row i's image and column i's text share caption i).
    """
    caption_ids = np.unique(np.array(captions), return_inverse=True)[1]
    same = torch.as_tensor(caption_ids[:, None] == caption_ids[None, :], dtype=logits.dtype)
    targets = same / same.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def counterfactual_scenes(
    seeds: list[int], two_object_fraction: float, excluded: frozenset[str], rng: np.random.Generator
) -> tuple[np.ndarray, list[str]]:
    """Each seed's training scene with one attribute of its first object (or its background) changed.

    The attribute is drawn uniformly from shape, colour and background, the new value uniformly from
    the others; a change whose caption is a held-out one is re-drawn, so held-out captions stay unseen.

    Args:
        seeds: the scenes' seeds (as `training_scenes` drew them, held-out captions excluded).
        two_object_fraction: the data config's, to re-draw the same scenes.
        excluded: captions never rendered for training.
        rng: the stage's generator.

    Returns:
        uint8 (len(seeds), 64, 64, 3) images and their captions.
    """
    images, captions = [], []
    for seed in seeds:
        scene = generator.sample_scene(seed, two_object_fraction, exclude_captions=excluded)
        while True:
            attribute = str(rng.choice(tuple(generator.ATTRIBUTE_VALUES)))
            current = scene.background if attribute == "background" else getattr(scene.objects[0], attribute)
            value = str(rng.choice([v for v in generator.ATTRIBUTE_VALUES[attribute] if v != current]))
            edited = generator.counterfactual(scene, attribute, value)
            if edited.caption not in excluded:
                break
        images.append(edited.image)
        captions.append(edited.caption)
    return np.stack(images), captions


def resized_scenes(
    seeds: list[int], two_object_fraction: float, excluded: frozenset[str], rng: np.random.Generator
) -> np.ndarray:
    """Each seed's training scene with its first object's radius scaled by U(0.6, 1.0) and its centre
    moved by up to 8 pixels each way (kept inside the image); the caption does not change.

    Args:
        seeds: the scenes' seeds (as `training_scenes` drew them).
        two_object_fraction: the data config's, to re-draw the same scenes.
        excluded: captions never rendered for training.
        rng: the stage's generator.

    Returns:
        uint8 (len(seeds), 64, 64, 3) images.
    """
    scenes = [generator.sample_scene(seed, two_object_fraction, exclude_captions=excluded) for seed in seeds]
    return np.stack([generator.render(resized_scene(scene, rng)).image for scene in scenes])


def resized_scene(scene: generator.Scene, rng: np.random.Generator) -> generator.Scene:
    """`scene` with its first object's radius x U(0.6, 1.0) and centre moved by U(-8, 8) pixels per axis
    (see `resize_first_object`)."""
    scale = float(rng.uniform(0.6, 1.0))
    shift = (float(rng.uniform(-8.0, 8.0)), float(rng.uniform(-8.0, 8.0)))
    return resize_first_object(scene, scale, shift)


def resize_first_object(scene: generator.Scene, scale: float, shift: tuple[float, float]) -> generator.Scene:
    """`scene` with its first object's radius x `scale` and centre moved by `shift` (x, y) pixels, clipped
    so that the object stays inside the image; shape, colour, background and caption kept."""
    first = scene.objects[0]
    radius = first.radius * scale
    low, high = radius + 1.0, generator.IMAGE_SIZE - radius - 1.0
    center = tuple(float(np.clip(c + d, low, high)) for c, d in zip(first.center, shift, strict=True))
    moved = dataclasses.replace(first, radius=radius, center=center)
    return dataclasses.replace(scene, objects=(moved, *scene.objects[1:]))


# Relative amplitude of each bending harmonic (orders 2 and 3: dents and bulges; order 5 would make a
# star of a circle, so it is left out) and of the colour's mottling.
WOBBLE_AMPLITUDE = 0.15
MOTTLE_AMPLITUDE = 0.3


def wobbly_scenes(
    seeds: list[int], two_object_fraction: float, excluded: frozenset[str], rng: np.random.Generator
) -> np.ndarray:
    """Each seed's training scene rendered by `wobbly_image`; the caption does not change.

    Returns:
        uint8 (len(seeds), 64, 64, 3) images.
    """
    scenes = [generator.sample_scene(seed, two_object_fraction, exclude_captions=excluded) for seed in seeds]
    return np.stack([wobbly_image(scene, rng) for scene in scenes])


def wobbly_image(scene: generator.Scene, rng: np.random.Generator) -> np.ndarray:
    """`scene` rendered with its first object's outline bent and its colour mottled.

    Each outline point's distance from the centre is scaled by 1 + sum_k a_k cos(k theta + phi_k) over
    the orders k = 2, 3 (a_k ~ U(0, WOBBLE_AMPLITUDE)); the colour is multiplied by 1 + MOTTLE_AMPLITUDE
    times a smooth field in [-1, 1] (a 4 x 4 grid of uniform values, bilinearly upsampled). Background and
    the other objects are rendered as `generator.render` does.

    Returns:
        uint8 (64, 64, 3).
    """
    first = scene.objects[0]
    outline = generator.object_outline(first)
    offsets = outline - np.asarray(first.center)
    angles = np.arctan2(offsets[:, 1], offsets[:, 0])
    bend = np.ones_like(angles)
    for order in (2, 3):
        bend += rng.uniform(0.0, WOBBLE_AMPLITUDE) * np.cos(order * angles + rng.uniform(0.0, 2.0 * np.pi))
    coverage = generator.polygon_coverage(np.asarray(first.center) + offsets * bend[:, None])
    grid = torch.as_tensor(rng.uniform(-1.0, 1.0, (1, 1, 4, 4)), dtype=torch.float32)
    field = F.interpolate(grid, size=(generator.IMAGE_SIZE,) * 2, mode="bilinear", align_corners=True)[0, 0]
    colour = np.asarray(generator.COLORS[first.color], np.float32)
    mottled = colour[None, None] * (1.0 + MOTTLE_AMPLITUDE * field.numpy()[..., None])
    canvas = generator.background_image(scene.background, scene.seed).astype(np.float32)
    canvas = canvas * (1.0 - coverage[..., None]) + mottled * coverage[..., None]
    for obj in scene.objects[1:]:
        alpha = generator.object_coverage(obj)[..., None]
        canvas = canvas * (1.0 - alpha) + np.asarray(generator.COLORS[obj.color], np.float32) * alpha
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def clip_normalizer(model) -> Callable[[np.ndarray], torch.Tensor]:
    """uint8 (B, 64, 64, 3) -> normalised float (B, 3, 64, 64) exactly as open_clip's preprocess does."""
    mean = torch.tensor(model.visual.preprocess_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.visual.preprocess_cfg["std"]).view(1, 3, 1, 1)

    def normalize(images: np.ndarray) -> torch.Tensor:
        return (torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255.0 - mean) / std

    return normalize


@torch.no_grad()
def clip_caption_accuracy(model, tokenizer, scenes: SceneSet) -> dict[str, float]:
    """Top-1 accuracy of picking each one-object image's caption among all 144 one-object captions."""
    captions = [
        generator.one_object_caption(color, shape, background)
        for color, shape, background in itertools.product(
            generator.COLORS, generator.SHAPES, generator.BACKGROUNDS
        )
    ]
    text = model.encode_text(tokenizer(captions), normalize=True)
    image = model.encode_image(clip_normalizer(model)(scenes.images), normalize=True)
    chosen = (image @ text.T).argmax(1).tolist()
    correct = [captions[choice] == caption for choice, caption in zip(chosen, scenes.captions, strict=True)]
    return {"heldout_caption_top1_of_144": float(np.mean(correct))}
