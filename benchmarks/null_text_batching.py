"""Null-text inversion throughput: batch 1 (the reference way, one image at a time) vs batch B.

Prints images/second for both and their ratio. Uses the shipped shapes-world model (the small
model: a 1.8 M-parameter UNet on 16x16x4 latents), `--model random` for a random-weight 64px
SD-architecture model built in a temporary folder, or --model PATH for any SD-family diffusers folder
or hub id.

    python benchmarks/null_text_batching.py --batch 8 --steps 10 --inner-steps 5
    python benchmarks/null_text_batching.py --model runwayml/stable-diffusion-v1-5 --device cuda --batch 8
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from pipeline.engine import InversionConfig, invert
from pipeline.models.build import SDArchitecture, build_random_sd
from pipeline.models.loading import load_diffusion_model

SHAPES_SD = Path(__file__).resolve().parents[1] / "pipeline" / "world" / "assets" / "shapes-sd"


def _images(count: int, size: int) -> torch.Tensor:
    return torch.randint(
        0, 256, (count, size, size, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )


def _timed(model, images, prompts, config) -> float:
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    invert(model, images, prompts, config)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        default=str(SHAPES_SD),
        help="diffusers folder, hub id, or 'random' (default: shapes world)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--inner-steps", type=int, default=5)
    parser.add_argument(
        "--repeats", type=int, default=3, help="timings per way, interleaved; the fastest of each counts"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        source = args.model
        if source == "random":
            source = build_random_sd(
                folder, SDArchitecture(image_size=64, unet_channels=(32, 64, 64)), unet_output_scale=0.05
            )
        model = load_diffusion_model(source, device=args.device)
    images = _images(args.batch, model.image_size)
    prompts = [f"a photo of object number {index}" for index in range(args.batch)]
    # early_stop_epsilon=-1 makes every image run all inner steps, so both ways do equal work.
    config = InversionConfig.of(
        method="null_text", num_steps=args.steps, inner_steps=args.inner_steps, early_stop_epsilon=-1.0
    )
    _timed(model, images[:1], prompts[:1], config)  # warm-up
    # The fastest of interleaved repeats: the least disturbed by other load on a shared machine.
    one_by_one_times, batched_times = [], []
    for _ in range(args.repeats):
        one_by_one_times.append(
            sum(_timed(model, images[i : i + 1], prompts[i : i + 1], config) for i in range(args.batch))
        )
        batched_times.append(_timed(model, images, prompts, config))
    one_by_one, batched = min(one_by_one_times), min(batched_times)
    print(
        f"device={model.device} model={model.model_id if args.model != 'random' else 'random 64px SD-architecture'}"
    )
    print(f"null-text, {args.steps} steps x {args.inner_steps} inner steps, {args.batch} images")
    print(f"batch 1: {args.batch / one_by_one:.3f} images/s ({one_by_one:.1f} s)")
    print(f"batch {args.batch}: {args.batch / batched:.3f} images/s ({batched:.1f} s)")
    print(f"speed-up: {one_by_one / batched:.2f}x (fastest of {args.repeats} interleaved repeats)")


if __name__ == "__main__":
    main()
