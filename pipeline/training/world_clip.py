"""The shapes world's tiny open_clip model (`shapes-clip-vit-tiny`), trained contrastively (`clip` stage).

Writes OUTPUT/shapes_clip.safetensors; its architecture is the shipped open_clip config
(`pipeline.world.clip_model`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from pipeline.training.loop import Budget, MetricsLog, optimize, seed_everything, training_device
from pipeline.training.world_config import TrainConfig
from pipeline.training.world_data import SceneSet, heldout_scenes, training_scenes
from pipeline.world import generator
from pipeline.world.clip_model import SHAPES_CLIP_NAME, SHAPES_CLIP_WEIGHTS, register_shapes_clip

CLIP_SEED_OFFSET = 2


def train_clip(config: TrainConfig):
    """Train the tiny open_clip model contrastively; identical captions in a batch count as positives.

    Records top-1 caption retrieval on held-out one-object scenes.

    Args:
        config: the training job.

    Returns:
        The trained open_clip model, on the CPU in eval mode.
    """
    rng = seed_everything(config.seed + CLIP_SEED_OFFSET)
    data = training_scenes(config)
    register_shapes_clip()
    device = training_device()
    model, _, _ = open_clip.create_model_and_transforms(SHAPES_CLIP_NAME, device=device)
    tokenizer = open_clip.get_tokenizer(SHAPES_CLIP_NAME)
    tokens = tokenizer(data.captions)
    caption_ids = np.unique(np.array(data.captions), return_inverse=True)[1]
    normalize = clip_normalizer(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.clip.lr, weight_decay=0.05)

    def loss_step() -> torch.Tensor:
        index = rng.choice(len(data.images), config.clip.batch, replace=False)
        image_features, text_features, logit_scale = model(
            normalize(data.images[index]).to(device), tokens[torch.as_tensor(index)].to(device)
        )[:3]
        logits = logit_scale * image_features @ text_features.T
        same = torch.as_tensor(
            caption_ids[index][:, None] == caption_ids[index][None, :], dtype=torch.float32
        )
        targets = same / same.sum(1, keepdim=True)
        return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))

    budget = Budget(config.clip.steps, config.clip.max_minutes)
    model.train()
    optimize(loss_step, optimizer, budget, stage="clip", peak_lr=config.clip.lr)
    model.cpu().eval()
    accuracy = clip_caption_accuracy(model, tokenizer, heldout_scenes(config, two_object_fraction=0.0))
    SHAPES_CLIP_WEIGHTS.parent.mkdir(parents=True, exist_ok=True)
    weights = Path(config.output) / SHAPES_CLIP_WEIGHTS.name
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, weights)
    MetricsLog(config.output).record(
        "clip", {"steps": budget.step, "wall_s": round(budget.elapsed), **accuracy}
    )
    return model


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
