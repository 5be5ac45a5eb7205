"""Which image changes a CLIP's text direction rewards: the direction loss's view of true counterfactuals.

    python -m benchmarks.clip_directions [--scenes 64] [--attribute shape] [--value star] [--keep color]
        [--clip-weights pipeline/world/assets/shapes_clip_guide.safetensors] [--clip-config ARCHITECTURE.json]

DiffusionCLIP's and ZIP's direction loss (papers/004 eq. 9) pulls the image direction
ΔI = E_I(edit) - E_I(source) towards the text direction ΔT. For held-out one-object scenes (seeds from
HELDOUT_SEED_OFFSET) that lack the value, this renders the shapes world's ground-truth counterfactuals
(the attribute set to the value; and, as distractors, the object recoloured to each colour, the
background changed to each background, the object shrunk to 0.6x, moved down by 8 pixels, or bent and mottled as
`world_clip.wobbly_image` does) and prints the mean cos(ΔI, ΔT) of each, for ΔT per image and
mean, with and without the kept attributes' directions projected out (`keep_attributes`). A text
direction that rewards a distractor as much as the true edit teaches an editor the distractor.
The training images (seeds from 0) give the kept directions and the mean ΔT, as in training.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.diffusion_clip_world import _value, heldout_scenes
from pipeline.methods.diffusion_clip import without_kept_directions
from pipeline.training.diffusion_clip import (
    ClipSpec,
    WorldData,
    kept_directions,
    load_clip,
    text_directions,
    world_training_texts,
)
from pipeline.training.world_clip import resize_first_object, wobbly_image
from pipeline.world import generator
from pipeline.world.clip_model import SHAPES_CLIP_CONFIG, SHAPES_CLIP_WEIGHTS


def image_embeddings(clip, images: list[np.ndarray]) -> torch.Tensor:
    return clip.image_embeddings(torch.as_tensor(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0)


def changes(scenes: list[generator.Scene], attribute: str, value: str) -> dict[str, list[np.ndarray | None]]:
    """Per change (the true edit, then each distractor), the edited image of every scene (None where the
    scene already has the distractor's value)."""
    edits = {
        f"{attribute} -> {value} (true edit)": [
            generator.counterfactual(s, attribute, value).image for s in scenes
        ]
    }
    for other, values in (("color", tuple(generator.COLORS)), ("background", generator.BACKGROUNDS)):
        if other == attribute:
            continue
        for candidate in values:
            edits[f"{other} -> {candidate}"] = [
                None if _value(s, other) == candidate else generator.counterfactual(s, other, candidate).image
                for s in scenes
            ]
    # Changes no caption names: an editor that finds them rewarded learns them for free.
    for name, scale, shift in (
        ("object 0.6x its size", 0.6, (0.0, 0.0)),
        ("object moved down 8 px", 1.0, (0.0, 8.0)),
    ):
        edits[name] = [generator.render(resize_first_object(s, scale, shift)).image for s in scenes]
    # Bent and mottled (the guidance CLIP's wobbly positives), drawn from a fixed seed.
    rng = np.random.default_rng(0)
    edits["object bent and mottled"] = [wobbly_image(s, rng) for s in scenes]
    return edits


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenes", type=int, default=64)
    parser.add_argument("--attribute", default="shape")
    parser.add_argument("--value", default="star")
    parser.add_argument("--keep", nargs="*", default=["color"])
    parser.add_argument("--output", default=None, help="write the table as JSON here")
    parser.add_argument(
        "--clip-weights", default=str(SHAPES_CLIP_WEIGHTS), help="weights of the CLIP architecture"
    )
    parser.add_argument(
        "--clip-config",
        default=str(SHAPES_CLIP_CONFIG),
        help="the weights' open_clip architecture (a JSON config, registered under its file stem)",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    spec = ClipSpec(Path(args.clip_config).stem, args.clip_weights, args.clip_config)
    clip = load_clip(spec, torch.device("cpu"))
    _, captions, counterfactuals = world_training_texts(WorldData(args.scenes, args.attribute, args.value, 0))
    kept = kept_directions(clip, captions, tuple(args.keep), ())
    mean_direction = text_directions(clip, captions, counterfactuals, "mean")[:1]
    scenes = heldout_scenes(args.scenes, [(args.attribute, args.value)])
    sources = [generator.render(s) for s in scenes]
    own = text_directions(
        clip,
        [s.caption for s in sources],
        [generator.counterfactual(s, args.attribute, args.value).caption for s in scenes],
        "per_image",
    )
    directions = {"per_image": own, "mean": mean_direction.expand_as(own)}
    if kept is not None:
        for name in list(directions):
            directions[f"{name}, keep {'+'.join(args.keep)}"] = without_kept_directions(
                directions[name], kept
            )
    source_embeddings = image_embeddings(clip, [s.image for s in sources])
    table: dict[str, dict[str, float]] = {}
    for change, images in changes(scenes, args.attribute, args.value).items():
        rows = [i for i, image in enumerate(images) if image is not None]
        edited = image_embeddings(clip, [images[i] for i in rows])
        image_direction = edited - source_embeddings[rows]
        table[change] = {
            name: round(float(F.cosine_similarity(image_direction, text[rows], dim=-1).mean()), 3)
            for name, text in directions.items()
        }
    names = list(directions)
    print(f"mean cos(ΔI, ΔT) over {args.scenes} held-out scenes")
    print(f"{'image change':<32}" + "".join(f"{name:>24}" for name in names))
    for change, row in table.items():
        print(f"{change:<32}" + "".join(f"{row[name]:>24.3f}" for name in names))
    if args.output:
        with open(args.output, "w") as file:
            json.dump(
                {
                    "scenes": args.scenes,
                    "keep": args.keep,
                    "clip_weights": os.path.relpath(args.clip_weights),
                    "clip_config": os.path.relpath(args.clip_config),
                    "cosines": table,
                },
                file,
                indent=1,
            )


if __name__ == "__main__":
    main()
