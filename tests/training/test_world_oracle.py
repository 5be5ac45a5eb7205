"""The shapes world's oracle stage: its blur augmentation, and a short run of the stage end to end."""

import json

import numpy as np
import torch
import yaml

from pipeline.training.cli import main
from pipeline.training.world_config import DEFAULT_CONFIG
from pipeline.training.world_oracle import blur_images, random_blur
from pipeline.world.oracle import load_oracle


def test_oracle_blur_augmentation_blurs_about_half_and_keeps_the_rest():
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.uniform(-1, 1, size=(64, 3, 16, 16)).astype(np.float32))
    blurred = random_blur(images, 1.5, np.random.default_rng(1))
    changed = (blurred != images).flatten(1).any(dim=1)
    assert 16 <= int(changed.sum()) <= 48
    # A blur averages neighbours: it lowers the pixel variance of noise, never raises it.
    assert (blurred[changed].flatten(1).var(dim=1) < images[changed].flatten(1).var(dim=1)).all()
    assert torch.equal(random_blur(images, 0.0, np.random.default_rng(1)), images)


def test_blur_keeps_flat_images_and_softens_edges():
    flat = np.full((1, 16, 16, 3), 77, dtype=np.uint8)
    assert np.array_equal(blur_images(flat, 1.5), flat)
    edge = np.zeros((1, 16, 16, 3), dtype=np.uint8)
    edge[:, :, 8:] = 255
    row = blur_images(edge, 1.5)[0, 8, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255 and 0 < row[7] < row[8] < 255


def test_oracle_stage_runs_seeded_and_records_its_metrics(tmp_path):
    """A few steps of `python -m pipeline.training oracle` on renders only: the same seed gives the same
    weights, the record names the steps and held-out accuracy, and the card is written."""
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(yaml.safe_load(DEFAULT_CONFIG.read_text())))
    weights, threads = [], torch.get_num_threads()
    for run in ("a", "b"):
        output = tmp_path / run
        try:
            main(
                ["oracle", "--config", str(job), "--threads", str(threads)]
                + [f"--set={key}" for key in (f"output={output}", f"cache_dir={tmp_path / 'cache'}")]
                + ["--set=data.train_scenes=48", "--set=data.heldout_scenes=8", "--set=oracle.steps=2"]
                + ["--set=oracle.batch=4", "--set=oracle.decoded_fraction=0", "--set=oracle.widths=[8,8,8,8]"]
                # The schedule's progress is max(step fraction, time fraction): a time budget this large
                # leaves the learning rates, hence the weights, to the steps alone.
                + ["--set=oracle.max_minutes=1000000000.0"]
            )
        finally:
            torch.set_num_threads(threads)
        record = json.loads((output / "train_metrics.json").read_text())["oracle"]
        assert record["steps"] == 2 and set(record["heldout_accuracy"]) == {"shape", "color", "background"}
        assert "heldout_accuracy_vae_reconstructions" not in record  # no shipped VAE in this output
        assert "| oracle | 2 |" in (output / "MODEL_CARD.md").read_text()
        weights.append(load_oracle(output).state_dict())
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
