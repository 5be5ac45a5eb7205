"""The downstream benchmark's pieces: its metrics against a confusion matrix counted by hand, its
conditions' contents, and the classical oversampling."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import torch

from benchmarks import downstream
from benchmarks.downstream import (
    CLASSES,
    RARE,
    Split,
    classical_oversampling,
    conditions,
    evaluate,
    render_split,
    subset,
)

STAR = CLASSES.index(RARE)


class _FixedPredictions(torch.nn.Module):
    """Answers with preset logits in order, whatever the images."""

    def __init__(self, predictions: np.ndarray):
        super().__init__()
        self.predictions = torch.from_numpy(predictions)
        self.seen = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        chunk = self.predictions[self.seen : self.seen + len(images)]
        self.seen += len(images)
        return torch.nn.functional.one_hot(chunk, len(CLASSES)).float()


def test_rare_recall_and_balanced_accuracy_follow_the_confusion_matrix():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, STAR, STAR, STAR, STAR, STAR])
    predictions = np.array([0, 1, 0, 1, 1, 2, 0, 2, 2, STAR, 0, STAR, 1, STAR])
    test = Split(np.zeros((len(labels), 64, 64, 3), np.uint8), labels)
    scores = evaluate(_FixedPredictions(predictions), test)
    confusion = np.zeros((len(CLASSES), len(CLASSES)))
    np.add.at(confusion, (labels, predictions), 1)
    per_class = np.diag(confusion) / confusion.sum(axis=1)
    assert scores["rare_recall"] == per_class[STAR] == 3 / 5
    assert np.isclose(scores["balanced_accuracy"], per_class.mean())


def test_classical_oversampling_keeps_the_originals_and_jitters_copies():
    rare, _ = render_split({RARE: 3}, 7_000_000)
    grown = classical_oversampling(rare, 10, np.random.default_rng(0))
    assert len(grown) == 10 and (grown.labels == STAR).all()
    np.testing.assert_array_equal(grown.images[:3], rare.images)
    assert all(not np.array_equal(grown.images[i], rare.images[i % 3]) for i in range(3, 10))


def test_conditions_add_the_right_edits_with_the_right_labels():
    train, _ = render_split({"circle": 4, "square": 4, "triangle": 4, RARE: 2}, 7_100_000)
    edits = Split(np.full((6, 64, 64, 3), 200, np.uint8), np.full(6, STAR))
    composites = Split(np.full((6, 64, 64, 3), 100, np.uint8), np.full(6, STAR))
    recon = Split(np.full((6, 64, 64, 3), 50, np.uint8), np.array([0, 1, 2, 0, 1, 2]))
    passed = np.array([True, False, True, True, False, True])
    job = {
        "all": edits,
        "composited": composites,
        "passed": passed,
        "oracle_star": np.array([True] * 5 + [False]),
        "recon": recon,
    }
    chosen = conditions(train, job, common=4, rng=np.random.default_rng(0))
    sizes = {name.split(" ")[0] + " " + name.split(" ")[1]: len(split) for name, split in chosen.items()}
    assert sizes["(a) none"] == 14 and sizes["(b) edits,"] == 20 and sizes["(c) edits,"] == 18
    assert sizes["(c*) edits,"] == 19
    composited = chosen["(d) filtered, composited"]
    assert (composited.images[14:] == 100).all() and (composited.labels[14:] == STAR).all()
    with_recon = chosen["(g) filtered + source reconstructions"]
    np.testing.assert_array_equal(with_recon.labels[18:], recon.labels[passed])
    classical = chosen["(e) classical oversampling"]
    assert (classical.labels == STAR).sum() == 4 and len(classical) == 16
    none = subset(chosen["(a) none"], np.arange(14))
    assert (none.labels == train.labels).all()


def test_job_settings_reach_the_augmentation_job_as_set_options(tmp_path, monkeypatch):
    seen = {}

    def fake_run(command, **kwargs):
        seen["command"] = command
        (tmp_path / "job" / "manifest.json").parent.mkdir()
        (tmp_path / "job" / "manifest.json").write_text(json.dumps({"counts": {"edits": 0}}))
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(downstream.subprocess, "run", fake_run)
    overrides = ["inversion.encoder_fit_steps=100", "output.composite=false"]

    manifest = downstream.run_augmentation_job(
        [str(tmp_path / "shapes-000000.tar")], tmp_path / "job", overrides
    )

    command = seen["command"]
    assert command[command.index("run") + 1] == str(downstream.JOB_SPEC)
    pairs = [command[i + 1] for i, argument in enumerate(command) if argument == "--set"]
    assert pairs == [f"input.shards=['{tmp_path}/shapes-{{000000..000000}}.tar']", *overrides]
    assert command[command.index("--output") + 1] == str(tmp_path / "job")
    assert manifest["counts"] == {"edits": 0} and "benchmark_wall_s" in manifest
