"""Distribution-level metrics of a job's output: per target class, FID and KID of its edits (and, with
output.composite, of their composites) against the real sources of that class, beside the same for
the unedited sources the edits were made from (how far the inputs were from the class to begin with).

    python -m benchmarks.distribution_metrics OUTPUT [--features pipeline.world.oracle:perceptual_features]
        [--world-reference N] [--kid-subsets 100] [--json PATH]

--world-reference N takes the real images of a shape class from the shapes world itself (N scenes
rendered by `pipeline.world.generator` with only that shape) instead of the output's sources, for
outputs whose sources hold too few images of the rare class to estimate a distribution.

Features: the spatial means of each feature map of `--features` (a `metrics.feature_extractor`
factory, by default the shapes world's oracle, the shapes demo's perceptual backbone), through
`pipeline.metrics.distribution` (torchmetrics' FID / KID with that extractor instead of InceptionV3).
These are per-set numbers, so they live here and not in the edits table. With a few dozen images per
set they are noisy (FID is biased upwards for small sets): compare sets of similar size only.
"""

from __future__ import annotations

import argparse
import io
import json

import numpy as np
import torch
from PIL import Image

from pipeline.factories import load_factory
from pipeline.metrics.distribution import (
    ImageFeatures,
    frechet_distance,
    kernel_distance,
    pooled_feature_maps,
)
from pipeline.report import connect

MIN_IMAGES = 2  # FID needs a covariance, KID a pair


def decode(pngs: list[bytes]) -> torch.Tensor:
    """PNG bytes -> (N, 3, H, W) float in [0, 1]."""
    arrays = [np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for data in pngs]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


def image_sets(output: str) -> dict[str, dict[str, list[bytes]]]:
    """Per target class: "real" (ok sources of that class), "edits", "composites" (non-null
    composite_image) and "inputs" (the sources the class's edits were made from, each once)."""
    connection = connect(output)
    sets: dict[str, dict[str, list[bytes]]] = {}
    targets = [
        row[0] for row in connection.sql("select distinct target_class from edits order by 1").fetchall()
    ]
    for target in targets:
        parameters = [target]
        sets[target] = {
            "real": _images(
                connection, "select image from sources where status = 'ok' and source_class = ?", parameters
            ),
            "edits": _images(connection, "select image from edits where target_class = ?", parameters),
            "composites": _images(
                connection,
                "select composite_image from edits where target_class = ? and composite_image is not null",
                parameters,
            ),
            "inputs": _images(
                connection,
                "select image from sources where source_id in "
                "(select distinct source_id from edits where target_class = ?)",
                parameters,
            ),
        }
    return sets


def _images(connection, sql: str, parameters: list) -> list[bytes]:
    return [row[0] for row in connection.execute(sql, parameters).fetchall()]


def world_renders(shape: str, count: int, first_seed: int = 1_000_000) -> list[bytes]:
    """`count` shapes-world scenes with only `shape` objects, as PNG bytes (seeds apart from the data's)."""
    from pipeline.stages.write import encode_png
    from pipeline.world.generator import SHAPES, render, sample_scene

    weights = {name: float(name == shape) for name in SHAPES}
    return [
        encode_png(render(sample_scene(first_seed + i, shape_weights=weights)).image) for i in range(count)
    ]


def class_distances(
    output: str, features: ImageFeatures, kid_subsets: int = 100, seed: int = 0, world_reference: int = 0
) -> dict[str, dict[str, dict]]:
    """Per target class and compared set ("edits", "composites", "inputs"): its size, FID and KID
    (mean, std) against the class's real images (its sources, or with world_reference > 0 that many
    shapes-world renders of the class); a set or a class with fewer than 2 images gets
    {"images": n, "real": n, "skipped": why} instead."""
    results: dict[str, dict[str, dict]] = {}
    for target, sets in image_sets(output).items():
        real = world_renders(target, world_reference) if world_reference else sets["real"]
        results[target] = {}
        for name in ("edits", "composites", "inputs"):
            generated = sets[name]
            if len(real) < MIN_IMAGES or len(generated) < MIN_IMAGES:
                results[target][name] = {
                    "images": len(generated),
                    "real": len(real),
                    "skipped": f"needs at least {MIN_IMAGES} images on each side",
                }
                continue
            real_images, generated_images = decode(real), decode(generated)
            kid_mean, kid_std = kernel_distance(
                real_images, generated_images, features, subsets=kid_subsets, seed=seed
            )
            results[target][name] = {
                "images": len(generated),
                "real": len(real),
                "fid": frechet_distance(real_images, generated_images, features),
                "kid_mean": kid_mean,
                "kid_std": kid_std,
            }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("output", help="a job's output folder or URI")
    parser.add_argument("--features", default="pipeline.world.oracle:perceptual_features")
    parser.add_argument("--kid-subsets", type=int, default=100)
    parser.add_argument("--world-reference", type=int, default=0, help="real images rendered per class")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    features = pooled_feature_maps(load_factory(args.features)(), f"features:{args.features}")
    classes = class_distances(args.output, features, args.kid_subsets, world_reference=args.world_reference)
    reference = f"{args.world_reference} shapes-world renders" if args.world_reference else "sources"
    results = {"features": features.name, "real": reference, "classes": classes}
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
