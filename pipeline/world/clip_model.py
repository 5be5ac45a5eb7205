"""The shapes world's tiny open_clip model: its config, registration with open_clip, and loading.

Usage (what CLIP metrics do)::

    from pipeline.world.clip_model import SHAPES_CLIP_NAME, SHAPES_CLIP_WEIGHTS, register_shapes_clip
    register_shapes_clip()
    model, _, preprocess = open_clip.create_model_and_transforms(SHAPES_CLIP_NAME, pretrained=str(SHAPES_CLIP_WEIGHTS))
    tokenizer = open_clip.get_tokenizer(SHAPES_CLIP_NAME)   # CLIP's BPE, context length 77
"""

from __future__ import annotations

from pathlib import Path

import open_clip

ASSETS = Path(__file__).parent / "assets"
SHAPES_CLIP_NAME = "shapes-clip-vit-tiny"
# The config folder holds only this model's JSON: open_clip.add_model_config registers every *.json in it.
SHAPES_CLIP_CONFIG_DIR = ASSETS / "open_clip"
SHAPES_CLIP_CONFIG = SHAPES_CLIP_CONFIG_DIR / f"{SHAPES_CLIP_NAME}.json"
SHAPES_CLIP_WEIGHTS = ASSETS / "shapes_clip.safetensors"
# The same architecture trained longer with counterfactual hard negatives: the guidance of trained editors.
SHAPES_CLIP_GUIDE_WEIGHTS = ASSETS / "shapes_clip_guide.safetensors"


def register_shapes_clip() -> str:
    """Register the shapes-world model config with open_clip (idempotent) and return its name."""
    if SHAPES_CLIP_NAME not in open_clip.list_models():
        if not SHAPES_CLIP_CONFIG.is_file():
            raise FileNotFoundError(f"open_clip config {SHAPES_CLIP_CONFIG} is missing; reinstall inversa")
        open_clip.add_model_config(SHAPES_CLIP_CONFIG_DIR)
    return SHAPES_CLIP_NAME


def load_shapes_clip(device: str = "cpu", weights: str | Path | None = None):
    """(model, preprocess, tokenizer) of the trained shapes-world CLIP, in eval mode.

    Args:
        device: where the model goes.
        weights: a checkpoint of this architecture (default: the shipped shapes_clip.safetensors).
    """
    register_shapes_clip()
    weights = Path(weights) if weights is not None else SHAPES_CLIP_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing; train it with `python -m pipeline.world.train clip`")
    model, _, preprocess = open_clip.create_model_and_transforms(
        SHAPES_CLIP_NAME, pretrained=str(weights), device=device
    )
    return model.eval(), preprocess, open_clip.get_tokenizer(SHAPES_CLIP_NAME)
