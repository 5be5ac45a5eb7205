"""Session fixtures: a tiny random-weight SD model saved in diffusers format and loaded by path (engine
tests); a local Ray, tiny SD and CLIP on disk, tiny WebDataset shards with bad samples, and one clean
run of the job shared by several tests (job tests)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.models.build import SDArchitecture, build_random_sd
from pipeline.models.loading import DiffusionModel, load_diffusion_model

# INVERSA_TEST_THREADS=1 lets mutation testing fork the test process safely (no OpenMP pool).
torch.set_num_threads(int(os.environ.get("INVERSA_TEST_THREADS", "2")))

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("tiny-sd")
    build_random_sd(folder, SDArchitecture(image_size=32), seed=0, unet_output_scale=0.05)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_sd(tiny_sd_path) -> DiffusionModel:
    return load_diffusion_model(tiny_sd_path)


@pytest.fixture(scope="session")
def images() -> torch.Tensor:
    """Four 32x32 RGB images with smooth structure (a blob on a gradient), uint8 (4, 32, 32, 3)."""
    generator = torch.Generator().manual_seed(0)
    grid = torch.linspace(-1, 1, 32)
    y, x = torch.meshgrid(grid, grid, indexing="ij")
    batch = []
    for index in range(4):
        center = torch.rand(2, generator=generator) - 0.5
        blob = ((x - center[0]) ** 2 + (y - center[1]) ** 2 < 0.2).float()
        color = torch.rand(3, generator=generator)
        background = (x[..., None] + 1) / 4 * torch.rand(3, generator=generator)
        image = background * (1 - blob[..., None]) + color * blob[..., None]
        batch.append((image * 255).round().to(torch.uint8))
        del index
    return torch.stack(batch)


PROMPTS = [
    "a red circle on a white background",
    "a blue square on a gray background",
    "a green star on a black background",
    "a yellow triangle on a white background",
]


@pytest.fixture(scope="session")
def prompts() -> list[str]:
    return list(PROMPTS)


@pytest.fixture(scope="session")
def job_assets(tmp_path_factory) -> dict:
    """Model folder, CLIP files and shards on disk (built once)."""
    from job_data import job_shards

    from pipeline.metrics.clip import build_random_clip

    folder = tmp_path_factory.mktemp("job_assets")
    model = build_random_sd(folder / "model", SDArchitecture(image_size=32))
    clip = build_random_clip(folder / "clip")
    paths, samples = job_shards(folder / "shards")
    return {"folder": folder, "model": model, "clip": clip, "shards": paths, "samples": samples}


def job_spec_data(assets: dict, output: Path) -> dict:
    """A small job: cats and dogs -> fox (two seeds, word swap), cats -> dog (template, refine + blend)."""
    return {
        "name": "test-job",
        "input": {
            "shards": [str(assets["folder"] / "shards" / "shard-{000000..000002}.tar")],
            "retry": {"attempts": 2, "backoff_seconds": 0.1},  # the truncated shard fails fast
        },
        "model": {"path": str(assets["model"]), "device": "cpu"},
        "inversion": {"method": "null_text", "num_steps": 4, "inner_steps": 2, "guidance_scale": 3.0},
        "edits": [
            {"target_class": "fox", "source_classes": ["cat", "dog"], "seeds": [0, 1]},
            {
                "target_class": "dog",
                "source_classes": ["cat"],
                "prompt": {"mode": "template", "template": "a photo of a {color} {target}"},
                "control": {"mode": "replace", "blend_words": ["{source}", "{target}"]},
            },
        ],
        "metrics": {
            "clip": {
                "model_name": assets["clip"].model_name,
                "pretrained": str(assets["clip"].checkpoint_path),
                "config_file": str(assets["clip"].config_path),
            },
            "perceptual": "features:tiny",
            "feature_extractor": f"{TESTS / 'job_data.py'}:tiny_features",
            "classifier": f"{TESTS / 'job_data.py'}:tiny_classifier",
            "device": "cpu",
        },
        "filter": {"min_clip_t": 0.0},
        "resources": {"invert_edit": {"batch_size": 4}, "score": {"batch_size": 8}},
        # Compositing on, so that every job the tests run also writes and scores composites.
        "output": {"path": str(output), "composite": True, "composite_dilation": 1, "composite_feather": 2},
    }


@pytest.fixture(scope="session")
def write_job_spec(job_assets):
    """Write the test job spec for an output folder; returns the YAML path."""

    def write(output: Path, **changes) -> Path:
        data = job_spec_data(job_assets, output)
        data.update(changes)
        path = output.parent / f"{output.name}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    return write


@pytest.fixture(scope="session")
def ray_local():
    """A light local Ray (2 CPUs) whose workers import this checkout."""
    import ray

    paths = os.pathsep.join([str(ROOT), str(TESTS)])
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": paths}},
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def clean_run(ray_local, write_job_spec, tmp_path_factory) -> dict:
    """One uninterrupted run of the test job: {"output": path, "manifest": manifest, "spec": yaml path}."""
    from pipeline.config import load_config
    from pipeline.dataflow import run_job

    output = tmp_path_factory.mktemp("clean") / "out"
    spec = write_job_spec(output)
    manifest = run_job(load_config(spec))
    return {"output": output, "manifest": manifest, "spec": spec}


@pytest.fixture(scope="session")
def s3_env():
    """An S3-compatible server (moto) for the session, its address and credentials in os.environ (the
    standard AWS_* variables, which s3fs, pyarrow and any process started from here read)."""
    import logging

    from cluster import s3_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    with s3_server() as env, pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        yield env


@pytest.fixture()
def s3_bucket(s3_env, request) -> str:
    """A new, empty bucket on the session's S3 server; returns its s3:// URL."""
    import re
    import uuid

    import fsspec

    stem = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower())[:40].strip("-")
    name = f"{stem}-{uuid.uuid4().hex[:8]}"
    fsspec.filesystem("s3").mkdir(name)
    return f"s3://{name}"
