"""How the shapes-world oracle reads objects smaller than the world draws, and the size reading that
guards the world benchmarks against it (evaluation only).

    python -m benchmarks.oracle_sizes [--radii 5 6 8 9 10 12 14] [--calibration-scenes 256] [--write]

The world's one-object scenes have radii 10-20 px (7-12 with two objects); edits can shrink an object
below that. For each radius, every shape in six colours on every background (centred off the middle, as
edits are), the oracle's shape reading is scored right or wrong as rendered and as the shapes world's VAE
reconstructs it (every edit is decoded by that VAE), separately for the convex shapes (circle, square,
triangle) and for stars.

Calibration of `benchmarks.diffusion_clip_world.SIZE_KEPT`: the best edit any method can write is the
VAE's reconstruction of the ground truth. For the first `--calibration-scenes` held-out scenes of the
star benchmark, the ratio of that reconstruction's object area to the truth's (`object_areas`), its
minimum and percentiles, and the fraction the size reading keeps (it should keep all).
`--write` saves benchmarks/results/oracle_sizes.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from benchmarks.diffusion_clip_world import (
    SIZE_KEPT,
    heldout_scenes,
    object_areas,
    oracle_readings,
    sources_and_truths,
)
from pipeline.models.loading import load_diffusion_model
from pipeline.training.world_vae import vae_reconstructions
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


def right_readings(oracle, vae, scenes: list[generator.Scene]) -> dict[str, int]:
    """How many of the scenes' shapes the oracle names right (and how many it calls stars), as rendered
    and as decoded by `vae`."""
    images = np.stack([generator.render(scene).image for scene in scenes])
    truth = [scene.objects[0].shape for scene in scenes]
    counts = {"scenes": len(scenes)}
    for name, pixels in (("rendered", images), ("decoded", vae_reconstructions(vae, images))):
        read, _ = oracle_readings(oracle, torch.as_tensor(pixels))
        counts[f"right_{name}"] = sum(got == shape for got, shape in zip(read["shape"], truth, strict=True))
        counts[f"read_as_star_{name}"] = sum(got == "star" for got in read["shape"])
    return counts


def size_calibration(vae, count: int) -> dict[str, float]:
    """Object area of the VAE's reconstruction of each true star over the truth's, on the star benchmark's
    first `count` held-out scenes, and the fraction at or above SIZE_KEPT."""
    scenes = heldout_scenes(count, [("shape", "star")])
    _, truths = sources_and_truths(scenes, "shape", "star")
    decoded = torch.as_tensor(vae_reconstructions(vae, truths.numpy()))
    ratio = (object_areas(decoded, scenes) / object_areas(truths, scenes)).numpy()
    return {
        "scenes": count,
        "size_kept": SIZE_KEPT,
        "area_ratio_min": round(float(ratio.min()), 3),
        "area_ratio_p1": round(float(np.percentile(ratio, 1)), 3),
        "area_ratio_median": round(float(np.median(ratio)), 3),
        "area_ratio_max": round(float(ratio.max()), 3),
        "kept": float(np.mean(ratio >= SIZE_KEPT)),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--radii", type=float, nargs="+", default=[5, 6, 8, 9, 10, 12, 14])
    parser.add_argument("--calibration-scenes", type=int, default=256)
    parser.add_argument("--model", default="pipeline/world/assets/shapes-sd")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args(argv)
    oracle = load_oracle()
    vae = load_diffusion_model(args.model).vae
    convex = tuple(shape for shape in generator.SHAPES if shape != "star")
    results = {
        "radii": {
            f"{radius:g}": {
                "convex": right_readings(oracle, vae, scenes_of(convex, radius)),
                "star": right_readings(oracle, vae, scenes_of(("star",), radius)),
            }
            for radius in args.radii
        },
        "size_calibration": size_calibration(vae, args.calibration_scenes),
    }
    print(json.dumps(results, indent=1))
    if args.write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "oracle_sizes.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
