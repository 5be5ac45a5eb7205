"""Fixtures for the metrics tests: a tiny random-weight CLIP saved to disk, built once per run."""

from __future__ import annotations

import pytest
import torch

from pipeline.metrics.clip import ClipScorer, RandomClip, build_random_clip


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> RandomClip:
    """Config JSON + checkpoint of `tiny_clip_config()`, registered with open_clip."""
    return build_random_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="session")
def clip_scorer(tiny_clip: RandomClip) -> ClipScorer:
    """The tiny CLIP loaded from its checkpoint file, the way users load local weights."""
    return ClipScorer(
        tiny_clip.model_name, str(tiny_clip.checkpoint_path), model_config=tiny_clip.config_path
    )


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)
