"""Write shapes-world scenes as WebDataset tar shards.

    python -m pipeline.world.shards OUT --count N --shard-size K --seed S [--rare-shape star --rare-fraction 0.05]

Each sample KEY holds:
    KEY.png       the 64x64 RGB image
    KEY.txt       its caption
    KEY.cls       the class index: position of the primary object's shape in generator.SHAPES
                  (an integer, WebDataset's convention for .cls, so default decoders read it)
    KEY.class.txt the class name: the primary object's shape, e.g. "star"
    KEY.json      attributes (shapes, colours, background, exact layout, seed, mask bounding boxes);
                  `generator.scene_from_attributes(json)` rebuilds the scene for counterfactual renders
    KEY.mask.png  object masks as one 8-bit image: pixel value i+1 where object i is on top, 0 elsewhere
                  (objects[1] is drawn over objects[0]; each full silhouette is in the json's layout)
"""

from __future__ import annotations

import argparse
import io
import os
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from pipeline.world import generator


def shape_weights_for(rare_shape: str | None, rare_fraction: float) -> dict[str, float] | None:
    """Per-shape weights that give `rare_shape` the probability `rare_fraction` (others equal)."""
    if rare_shape is None:
        return None
    if rare_shape not in generator.SHAPES:
        raise ValueError(f"--rare-shape {rare_shape!r} is not a shape; use one of {generator.SHAPES}")
    if not 0.0 < rare_fraction < 1.0:
        raise ValueError(f"--rare-fraction must be in (0, 1), got {rare_fraction}")
    others = len(generator.SHAPES) - 1
    return {
        shape: (rare_fraction if shape == rare_shape else (1 - rare_fraction) / others)
        for shape in generator.SHAPES
    }


def label_mask(masks: np.ndarray) -> np.ndarray:
    """(n_objects, H, W) bool silhouettes -> (H, W) uint8 with i+1 where object i is topmost."""
    labels = np.zeros(masks.shape[1:], np.uint8)
    for index, mask in enumerate(masks):
        labels[mask] = index + 1
    return labels


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def sample_record(key: str, rendered: generator.RenderedScene) -> dict:
    """The WebDataset sample dict for one rendered scene."""
    return {
        "__key__": key,
        "png": _png(rendered.image),
        "txt": rendered.caption,
        "cls": generator.SHAPES.index(rendered.attributes["shape"]),
        "class.txt": rendered.attributes["shape"],
        "json": rendered.attributes,
        "mask.png": _png(label_mask(rendered.masks)),
    }


def write_shards(
    out: str | os.PathLike,
    count: int,
    shard_size: int,
    seed: int = 0,
    rare_shape: str | None = None,
    rare_fraction: float = 0.05,
    two_object_fraction: float = 0.2,
) -> list[Path]:
    """Render `count` scenes (seeds seed, seed+1, ...) into shards of `shard_size` samples.

    Returns:
        The shard paths, OUT/shapes-000000.tar, OUT/shapes-000001.tar, ...
    """
    if count < 1 or shard_size < 1:
        raise ValueError(f"--count and --shard-size must be >= 1, got {count} and {shard_size}")
    weights = shape_weights_for(rare_shape, rare_fraction)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard_index, start in enumerate(range(0, count, shard_size)):
        path = out / f"shapes-{shard_index:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for offset in range(start, min(start + shard_size, count)):
                scene = generator.sample_scene(seed + offset, two_object_fraction, shape_weights=weights)
                sink.write(sample_record(f"{seed + offset:09d}", generator.render(scene)))
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write shapes-world WebDataset shards.")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--count", type=int, required=True, help="number of scenes")
    parser.add_argument("--shard-size", type=int, default=1000, help="scenes per tar shard")
    parser.add_argument("--seed", type=int, default=0, help="first scene seed (scene i uses seed + i)")
    parser.add_argument("--rare-shape", default=None, help="make this shape rare (e.g. star)")
    parser.add_argument("--rare-fraction", type=float, default=0.05, help="probability of the rare shape")
    parser.add_argument("--two-object-fraction", type=float, default=0.2, help="probability of two objects")
    args = parser.parse_args(argv)
    paths = write_shards(
        args.out,
        args.count,
        args.shard_size,
        args.seed,
        args.rare_shape,
        args.rare_fraction,
        args.two_object_fraction,
    )
    print(f"wrote {args.count} scenes to {len(paths)} shards in {args.out}")


if __name__ == "__main__":
    main()
