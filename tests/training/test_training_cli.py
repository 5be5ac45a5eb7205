"""The training command: `python -m pipeline.training` and the documented `python -m pipeline.world.train`."""

import json
import subprocess
import sys

import pytest
import yaml

from pipeline.training import cli
from pipeline.training.world_config import DEFAULT_CONFIG

ROOT = DEFAULT_CONFIG.parents[1]


def _job(tmp_path):
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    raw["output"], raw["cache_dir"] = str(tmp_path / "out"), str(tmp_path / "cache")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_stages_run_in_the_documented_order():
    assert list(cli.stages()) == ["vae", "vae-decoder", "clip", "clip-guide", "unet", "vae-broad", "oracle"]


def test_world_train_is_the_same_command():
    import pipeline.world.train

    assert pipeline.world.train.main is cli.main


def test_card_stage_writes_the_card_only(tmp_path):
    job = _job(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "train_metrics.json").write_text(json.dumps({"clip": {"steps": 3, "wall_s": 1}}))
    # The documented entry point, as a user runs it.
    subprocess.run(
        [sys.executable, "-m", "pipeline.world.train", "card", "--config", str(job)], cwd=ROOT, check=True
    )
    card = (tmp_path / "out" / "MODEL_CARD.md").read_text()
    assert "| clip | 3 | 1 |" in card and "| vae | - | - | not trained |" in card
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [
        "MODEL_CARD.md",
        "train_metrics.json",
    ]


def test_bad_override_exits_naming_the_key(tmp_path):
    with pytest.raises(SystemExit, match=r"unet\.learning_rate: unknown key"):
        cli.main(["card", "--config", str(_job(tmp_path)), "--set", "unet.learning_rate=0.1"])
    assert not (tmp_path / "out").exists()
