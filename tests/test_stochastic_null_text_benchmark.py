"""The null-text VAE benchmark's rows (benchmarks/stochastic_null_text.py): a smaller K is the first K of
each image's samples, and its numbers are the metrics of exactly those."""

from __future__ import annotations

import pytest
import torch

from benchmarks import stochastic_null_text
from pipeline.metrics import psnr


def _distance(a, b):
    return (a - b).abs().flatten(1).mean(dim=1)


def test_rows_take_the_first_k_samples_of_every_image():
    generator = torch.Generator().manual_seed(0)
    source = torch.rand(2, 3, 4, 4, generator=generator)
    most = 3
    recons = torch.rand(2 * most, 3, 4, 4, generator=generator)
    edits = torch.rand(2 * most, 3, 4, 4, generator=generator)
    # The classifier reads a star where the edit's first pixel is above 0.5.
    stars = [bool(value > 0.5) for value in edits[:, 0, 0, 0]]

    def classify(images):
        return ["star" if value > 0.5 else "circle" for value in images[:, 0, 0, 0]]

    row = stochastic_null_text.measure(recons, edits, source, most, 2, _distance, classify, 3.0)
    kept = [0, 1, 3, 4]  # image 0's seeds 0, 1 and image 1's seeds 0, 1
    per_image = source[[0, 0, 1, 1]]
    assert row["temperature"] == 3.0 and row["samples"] == 2
    assert row["sampled_reconstruction_psnr"] == pytest.approx(psnr(recons[kept], per_image).mean().item())
    assert row["bound"] == pytest.approx(_distance(edits[kept], per_image).mean().item())
    expected_diversity = (_distance(edits[0:1], edits[1:2]) + _distance(edits[3:4], edits[4:5])) / 2
    assert row["diversity"] == pytest.approx(expected_diversity.item())
    assert row["star_rate"] == pytest.approx(sum(stars[i] for i in kept) / 4)
    single = stochastic_null_text.measure(recons, edits, source, most, 1, _distance, classify, 3.0)
    assert single["diversity"] is None
    assert single["bound"] == pytest.approx(_distance(edits[[0, 3]], source).mean().item())
