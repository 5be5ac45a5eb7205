"""Fixtures of the training stages' tests."""

from collections.abc import Callable
from types import ModuleType

import pytest

from pipeline.training import world_vae


@pytest.fixture
def loss_spy(monkeypatch) -> Callable[[ModuleType], list[float]]:
    """Replace a module's `reconstruction_loss` by one that records each call's frequency weight."""

    def spy_on(module: ModuleType) -> list[float]:
        weights = []
        loss = world_vae.reconstruction_loss

        def recording_loss(reconstruction, images, frequency_weight=0.0):
            weights.append(frequency_weight)
            return loss(reconstruction, images, frequency_weight)

        monkeypatch.setattr(module, "reconstruction_loss", recording_loss)
        return weights

    return spy_on
