"""Ray Train runs of a training task for the tests of its kind: a run, and a run killed after a checkpoint
that must resume to the uninterrupted run's result."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from pipeline.training.ray_train import RunSettings, history_of, run_training
from pipeline.training.spec import TASKS


def train(
    kind: str, config: Any, output, iterations: int, workers: int = 1, interrupt_after: int | None = None
) -> dict:
    """The manifest of a run of `kind`'s task with `config` (a checkpoint after every iteration)."""
    settings = RunSettings(output=str(output), iterations=iterations, checkpoint_every=1, workers=workers)
    return run_training(TASKS[kind][1], dataclasses.asdict(config), settings, interrupt_after=interrupt_after)


def assert_resumes_to_the_same_result(
    kind: str, config: Any, output, iterations: int, uninterrupted: dict, killed_after: int
) -> None:
    """A run killed after `killed_after` iterations, run again, resumes from its checkpoint and ends with
    the uninterrupted run's loss history and weights (the artefact's version), bit for bit."""
    from ray.train import TrainingFailedError

    with pytest.raises(TrainingFailedError):
        train(kind, config, output, iterations, interrupt_after=killed_after)
    resumed = train(kind, config, output, iterations)
    assert resumed["metrics"]["resumed_from"] == killed_after  # the first iterations came from the checkpoint
    assert history_of(resumed) == history_of(uninterrupted)
    assert resumed["version"] == uninterrupted["version"]
