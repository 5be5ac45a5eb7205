"""StyleDiffusion against null-text inversion on the shapes world, on the same scenes and settings.

    python -m benchmarks.style_diffusion_world [--scenes 4] [--steps 10] [--inner-steps 100]

Both methods invert the held-out one-object scenes with their captions and edit the primary object's
shape by a Prompt-to-Prompt word swap (`benchmarks.world_editing.evaluate_method`: reconstruction
PSNR, PSNR against the ground-truth edit inside and outside the changed region, oracle readings,
seconds per image) and the structure distance of each edit to its source (self-similarity of the
same vision tower's patch tokens, x 1e3). StyleDiffusion's E(x) is the shapes world's own open_clip vision tower; null-text
runs with its paper defaults. `--inner-steps` is StyleDiffusion's K (paper: 100).
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks.world_editing import evaluate_method
from pipeline.metrics.clip import ClipScorer
from pipeline.models.loading import load_diffusion_model
from pipeline.training.world_data import HELDOUT_SEED_OFFSET, SD_FOLDER_NAME
from pipeline.world.clip_model import SHAPES_CLIP_NAME, SHAPES_CLIP_WEIGHTS, register_shapes_clip
from pipeline.world.groundtruth import shape_swap_edits
from pipeline.world.model_card import ASSETS
from pipeline.world.oracle import load_oracle


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenes", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps (paper: 30)")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--inner-steps", type=int, default=100, help="StyleDiffusion's K")
    parser.add_argument("--learning-rate", type=float, default=1e-4, help="StyleDiffusion's Adam lr")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = load_diffusion_model(ASSETS / SD_FOLDER_NAME)
    oracle = load_oracle(ASSETS)
    register_shapes_clip()
    image_encoder = ClipScorer(SHAPES_CLIP_NAME, str(SHAPES_CLIP_WEIGHTS), model.device).image_tokens
    edits = shape_swap_edits(range(HELDOUT_SEED_OFFSET, HELDOUT_SEED_OFFSET + args.scenes))
    table = {
        "setup": f"{args.scenes} held-out scenes, shape word swap (P2P replace), DDIM {args.steps} steps, "
        f"w={args.guidance}; style_diffusion K={args.inner_steps}, lr={args.learning_rate:g}",
        "methods": {},
    }
    print(table["setup"])
    runs = {
        "null_text": dict(method="null_text", learning_rate=None),
        "style_diffusion": dict(
            method="style_diffusion",
            learning_rate=args.learning_rate,
            image_encoder=image_encoder,
            settings={"inner_steps": args.inner_steps},
        ),
    }
    for name, run in runs.items():
        table["methods"][name] = evaluate_method(
            model,
            oracle,
            edits,
            steps=args.steps,
            guidance=args.guidance,
            structure_tokens=image_encoder,
            **run,
        )
        print(name, json.dumps(table["methods"][name]), flush=True)
    return table


if __name__ == "__main__":
    main()
