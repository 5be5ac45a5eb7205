"""Ray overhead and throughput of the augmentation job: job wall time / summed in-actor compute time,
images per hour and, on a GPU, the share of the job's wall time the GPU is busy.

In-actor compute is the time the invert/edit and score actors spend inside their __call__ (each row
carries its share; the writer sums them per shard into the manifest's compute_seconds). With one
actor per stage the two stages overlap, so a ratio below 1 is possible on a multi-shard input.

    python -m benchmarks.ray_overhead --shards 6 --per-shard 4 --num-steps 4
    python -m benchmarks.ray_overhead --architecture sd15-random --device cuda --precision mixed \
        --shards 4 --per-shard 32 --batch-size 8 --num-steps 50 --json benchmarks/results/job-gpu.json

`--architecture tiny` (a 32 px random model, the default), `reduced-sd` (256 px) or `sd15-random` (SD 1.5's
UNet / VAE / text encoder at 512 px, random weights, the per-image cost of the real model) builds the
model once; on `--device cuda` the invert/edit actor takes one GPU and NVML samples the device's
utilisation every 20 ms through the whole job (`gpu_busy`: the mean; the issue's target is >= 0.8).
Prints the ratio (target <= 1.10 on a multi-shard input), images per hour and the GPU's busy share.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def _architecture(name: str):
    """The random model of `--architecture`: throughput's named models, or a 32 px toy."""
    from benchmarks.throughput import RANDOM_MODELS
    from pipeline.models.build import SDArchitecture

    return {"tiny": SDArchitecture(image_size=32), **RANDOM_MODELS}[name]


def job_spec(args, folder: Path) -> dict:
    """Writes the random model, a random CLIP and the input shards under `folder`; returns the job spec."""
    from job_data import good, write_tar

    from pipeline.metrics.clip import build_random_clip
    from pipeline.models.build import build_random_sd

    architecture = _architecture(args.architecture)
    side = architecture.image_size
    model = build_random_sd(folder / "model", architecture)
    clip = build_random_clip(folder / "clip")
    for shard in range(args.shards):
        samples = [
            good(f"s{shard}/{i}", "cat" if i % 2 else "dog", shard * 100 + i, size=(side, side))
            for i in range(args.per_shard)
        ]
        write_tar(folder / f"shard-{shard:06d}.tar", samples)
    gpus = 1.0 if args.device == "cuda" else 0.0
    return {
        "input": {"shards": [str(folder / f"shard-{{000000..{args.shards - 1:06d}}}.tar")]},
        "model": {"path": str(model), "device": args.device, "precision": args.precision},
        "inversion": {"method": args.method, "num_steps": args.num_steps, "inner_steps": args.inner_steps},
        "edits": [{"target_class": "fox", "seeds": [0, 1]}],
        "metrics": {
            "clip": {
                "model_name": clip.model_name,
                "pretrained": str(clip.checkpoint_path),
                "config_file": str(clip.config_path),
            },
            "perceptual": "features:tiny",
            "feature_extractor": f"{ROOT / 'tests' / 'job_data.py'}:tiny_features",
            "device": "cpu",
        },
        "resources": {
            "invert_edit": {"batch_size": args.batch_size, "num_gpus": gpus},
            "score": {"batch_size": 16},
        },
        "output": {"path": str(folder / "out")},
    }


def measure(args) -> dict:
    """Runs the job once (Ray started here unless already up) and returns its timings."""
    import torch

    from benchmarks.throughput import GpuBusy
    from pipeline.config import parse_config
    from pipeline.dataflow import run_job

    folder = Path(tempfile.mkdtemp(prefix="inversa-bench-"))
    spec = job_spec(args, folder)
    (folder / "job.yaml").write_text(yaml.safe_dump(spec))
    if not ray.is_initialized():
        ray.init(
            num_cpus=args.num_cpus,
            num_gpus=torch.cuda.device_count() if args.device == "cuda" else 0,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}},
        )
    ray.data.DataContext.get_current().enable_progress_bars = False
    busy = GpuBusy(torch.device(args.device))
    started = time.perf_counter()
    with busy.sampling():
        manifest = run_job(parse_config(spec), overwrite=True)
    wall = time.perf_counter() - started
    images = manifest["counts"]["sources"]
    return {
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or "cpu",
        "architecture": args.architecture,
        "method": args.method,
        "precision": args.precision,
        "num_steps": args.num_steps,
        "batch_size": args.batch_size,
        "images": images,
        "edits": manifest["counts"]["edits"],
        "wall_seconds": wall,
        "compute_seconds": manifest["compute_seconds"],
        "overhead_ratio": wall / manifest["compute_seconds"],
        "images_per_hour": images / wall * 3600,
        "gpu_busy": busy.mean(),
        "status": manifest["status"],
    }


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=6)
    parser.add_argument("--per-shard", type=int, default=4)
    parser.add_argument("--num-steps", type=int, default=4)
    parser.add_argument("--inner-steps", type=int, default=2)
    parser.add_argument("--method", default="null_text")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--architecture", choices=["tiny", "reduced-sd", "sd15-random"], default="tiny")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["fp32", "tf32", "mixed", "bf16"], default="fp32")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result = measure(args)
    busy = "n/a (no GPU)" if result["gpu_busy"] is None else f"{result['gpu_busy']:.1%}"
    print(
        f"inputs: {args.shards} shards x {args.per_shard} images, {result['edits']} edits ({result['device']})"
    )
    print(
        f"job wall time {result['wall_seconds']:.1f} s, summed in-actor compute {result['compute_seconds']:.1f} s"
    )
    print(f"ray overhead ratio (wall / compute): {result['overhead_ratio']:.3f}")
    print(f"images per hour: {result['images_per_hour']:.0f}; GPU busy: {busy}")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
