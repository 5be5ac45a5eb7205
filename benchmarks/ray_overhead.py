"""Ray overhead of the augmentation job: job wall time / summed in-actor compute time.

In-actor compute is the time the invert/edit and score actors spend inside their __call__ (each row
carries its share; the writer sums them per shard into the manifest's compute_seconds). With one
actor per stage the two stages overlap, so a ratio below 1 is possible on a multi-shard input.

    python -m benchmarks.ray_overhead --shards 6 --per-shard 4 --num-steps 4
Prints the ratio (target <= 1.10 on a multi-shard input).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=6)
    parser.add_argument("--per-shard", type=int, default=4)
    parser.add_argument("--num-steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--num-cpus", type=int, default=2)
    args = parser.parse_args()

    from job_data import good, write_tar

    from pipeline.config import parse_config
    from pipeline.dataflow import run_job
    from pipeline.metrics.clip import build_random_clip
    from pipeline.models.build import SDArchitecture, build_random_sd

    folder = Path(tempfile.mkdtemp(prefix="inversa-bench-"))
    model = build_random_sd(folder / "model", SDArchitecture(image_size=32))
    clip = build_random_clip(folder / "clip")
    for shard in range(args.shards):
        samples = [
            good(f"s{shard}/{i}", "cat" if i % 2 else "dog", shard * 100 + i) for i in range(args.per_shard)
        ]
        write_tar(folder / f"shard-{shard:06d}.tar", samples)
    spec = {
        "input": {"shards": [str(folder / f"shard-{{000000..{args.shards - 1:06d}}}.tar")]},
        "model": {"path": str(model), "device": "cpu"},
        "inversion": {"method": "null_text", "num_steps": args.num_steps, "inner_steps": 2},
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
        "resources": {"invert_edit": {"batch_size": args.batch_size}, "score": {"batch_size": 16}},
        "output": {"path": str(folder / "out")},
    }
    (folder / "job.yaml").write_text(yaml.safe_dump(spec))
    ray.init(
        num_cpus=args.num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}},
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    started = time.perf_counter()
    manifest = run_job(parse_config(spec), overwrite=True)
    wall = time.perf_counter() - started
    compute = manifest["compute_seconds"]
    print(f"inputs: {args.shards} shards x {args.per_shard} images, {manifest['counts']['edits']} edits")
    print(f"job wall time {wall:.1f} s, summed in-actor compute {compute:.1f} s")
    print(f"ray overhead ratio (wall / compute): {wall / compute:.3f}")


if __name__ == "__main__":
    main()
