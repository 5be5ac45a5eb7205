"""How the shapes-world oracle reads objects smaller than the world draws, plain and zoomed (evaluation only).

    python -m benchmarks.oracle_sizes [--radii 3 4 5 6 8 10 14] [--write]

The world's one-object scenes have radii 10-20 px (7-12 with two objects); edits can shrink an object
below that. For each radius, every shape in six colours on every background (centred off the middle, as
edits are), the oracle's shape reading is scored right or wrong as rendered and after
`benchmarks.diffusion_clip_world.zoomed_to_object`, separately for the convex shapes (circle, square,
triangle) and for stars. `--write` saves benchmarks/results/oracle_sizes.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from benchmarks.diffusion_clip_world import oracle_readings, zoomed_to_object
from pipeline.world import generator
from pipeline.world.oracle import load_oracle

RESULTS = Path(__file__).parent / "results"


def scenes_of(shapes: tuple[str, ...], radius: float) -> list[generator.Scene]:
    return [
        generator.Scene(
            objects=(generator.SceneObject(shape=shape, color=color, center=(27.0, 35.0), radius=radius),),
            background=background,
            seed=1,
        )
        for shape in shapes
        for background in generator.BACKGROUNDS
        for color in generator.COLORS
    ]


def right_readings(oracle, scenes: list[generator.Scene]) -> dict[str, int]:
    """How many of the scenes' shapes the oracle names right, as rendered and zoomed to the object."""
    images = torch.as_tensor(np.stack([generator.render(scene).image for scene in scenes]))
    truth = [scene.objects[0].shape for scene in scenes]
    plain, _ = oracle_readings(oracle, images)
    zoomed, _ = oracle_readings(oracle, zoomed_to_object(images, scenes))
    return {
        "scenes": len(scenes),
        "right": sum(name == shape for name, shape in zip(plain["shape"], truth, strict=True)),
        "right_zoomed": sum(name == shape for name, shape in zip(zoomed["shape"], truth, strict=True)),
        "read_as_star": sum(name == "star" for name in plain["shape"]),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--radii", type=float, nargs="+", default=[3, 4, 5, 6, 8, 10, 14])
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args(argv)
    oracle = load_oracle()
    convex = tuple(shape for shape in generator.SHAPES if shape != "star")
    results = {
        f"{radius:g}": {
            "convex": right_readings(oracle, scenes_of(convex, radius)),
            "star": right_readings(oracle, scenes_of(("star",), radius)),
        }
        for radius in args.radii
    }
    print(json.dumps(results, indent=1))
    if args.write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "oracle_sizes.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
