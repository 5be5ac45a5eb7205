"""The metrics actor on hand-made edits whose background metrics are known in closed form."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import ClipMetricConfig, MetricsConfig
from pipeline.stages.rows import NO_FAILURES, decode_failures
from pipeline.stages.score import ScoreActor

SIZE = 32
TESTS = Path(__file__).resolve().parents[1]


def metrics_config(job_assets, classifier: str | None = None) -> MetricsConfig:
    clip = job_assets["clip"]
    return MetricsConfig(
        clip=ClipMetricConfig(clip.model_name, str(clip.checkpoint_path), str(clip.config_path)),
        perceptual="features:tiny",
        feature_extractor=f"{TESTS / 'job_data.py'}:tiny_features",
        classifier=classifier,
        device="cpu",
    )


@pytest.fixture(scope="module")
def actor(job_assets):
    return ScoreActor(metrics_config(job_assets, f"{TESTS / 'job_data.py'}:tiny_classifier"))


def edit_batch(source: np.ndarray, edits: list[tuple[np.ndarray, np.ndarray, bool]]) -> dict:
    """One ok row with the given (edited image, mask, has_mask) edits."""
    records = [
        {"edit_id": f"e{i}", "target_prompt": "a photo of a fox", "has_mask": has_mask}
        for i, (_, _, has_mask) in enumerate(edits)
    ]

    def column(values):
        array = np.empty(1, dtype=object)
        array[0] = values
        return array

    return {
        "status": np.array(["ok"], dtype=object),
        "failures": np.array([NO_FAILURES], dtype=object),
        "image": source[None],
        "recon": source[None],
        "caption": np.array(["a photo of a cat"], dtype=object),
        "edits_json": np.array([json.dumps(records)], dtype=object),
        "edit_images": column(np.stack([image for image, _, _ in edits])),
        "edit_masks": column(np.stack([mask for _, mask, _ in edits])),
        "stage_seconds": np.zeros(1),
    }


def test_background_metrics_follow_the_mask(actor):
    rng = np.random.default_rng(0)
    source = rng.integers(20, 200, size=(SIZE, SIZE, 3), dtype=np.uint8)
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    mask[8:20, 8:20] = True
    inside_only = source.copy()
    inside_only[mask] = 255 - inside_only[mask]
    offset_outside = inside_only.copy()
    offset_outside[~mask] += 10  # background off by exactly 10/255 everywhere
    full_mask = np.ones_like(mask)
    batch = edit_batch(
        source,
        [(inside_only, mask, True), (offset_outside, mask, True), (inside_only, full_mask, True)],
    )
    scored = actor(batch)
    assert scored["status"][0] == "ok", scored["failures"][0]
    first, second, third = json.loads(scored["edits_json"][0])
    # Unchanged background: identical pixels, infinite PSNR (not "undefined").
    assert first["bg_psnr"] == math.inf
    assert second["bg_psnr"] == pytest.approx(20 * math.log10(255 / 10), abs=1e-6)
    # The mask covers everything: no background, so the metrics are undefined.
    assert third["bg_psnr"] is None and third["bg_lpips"] is None
    # The edited region counts for LPIPS over the whole image, not for the background's.
    assert first["bg_lpips"] < first["lpips"]
    assert scored["recon_psnr"][0] == np.inf


def solid(red: int, blue: int) -> np.ndarray:
    image = np.full((SIZE, SIZE, 3), 100, dtype=np.uint8)
    image[..., 0], image[..., 2] = red, blue
    return image


def test_classifier_reads_each_edited_image(actor):
    """classified_as is the configured classifier's class of each edited image, in edit order."""
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    batch = edit_batch(solid(50, 50), [(solid(200, 10), mask, False), (solid(10, 200), mask, False)])
    scored = actor(batch)
    assert scored["status"][0] == "ok", scored["failures"][0]
    assert [e["classified_as"] for e in json.loads(scored["edits_json"][0])] == ["fox", "dog"]


def test_without_classifier_classified_as_is_null(job_assets):
    actor = ScoreActor(metrics_config(job_assets))
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    scored = actor(edit_batch(solid(50, 50), [(solid(200, 10), mask, False)]))
    assert [e["classified_as"] for e in json.loads(scored["edits_json"][0])] == [None]


def test_classifier_with_wrong_output_becomes_an_error_row(job_assets, tmp_path):
    module = tmp_path / "bad_classifier.py"
    module.write_text("def factory():\n    return lambda images: ['fox']\n")  # one name for any batch
    actor = ScoreActor(metrics_config(job_assets, f"{module}:factory"))
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    scored = actor(edit_batch(solid(50, 50), [(solid(200, 10), mask, False)] * 2))
    assert scored["status"][0] == "score_failed"
    [failure] = decode_failures(scored["failures"][0])
    assert (failure.stage, failure.error_type, failure.edit_id) == ("score", "TypeError", None)
    assert "metrics.classifier" in failure.message and "one class name" in failure.message


def test_diversity_is_the_mean_pairwise_distance_within_each_sample_group(actor):
    """Eq. 5: per sample group, the mean of d over its unordered pairs (computed here pair by pair with the
    actor's own perceptual distance), and the group's mean distance to the source as the bound."""
    rng = np.random.default_rng(1)
    source = rng.integers(0, 255, size=(SIZE, SIZE, 3), dtype=np.uint8)
    samples = [rng.integers(0, 255, size=(SIZE, SIZE, 3), dtype=np.uint8) for _ in range(5)]
    mask = np.ones((SIZE, SIZE), dtype=bool)
    batch = edit_batch(source, [(image, mask, False) for image in samples])
    records = json.loads(batch["edits_json"][0])
    # Two groups interleaved (three samples and one), and one deterministic edit.
    for record, group in zip(records, ["g", "h", "g", None, "g"], strict=True):
        record["sample_group"] = group
    batch["edits_json"][0] = json.dumps(records)
    scored = json.loads(actor(batch)["edits_json"][0])

    def distance(a: np.ndarray, b: np.ndarray) -> float:
        to_unit = lambda image: torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255  # noqa: E731
        return float(actor.perceptual(to_unit(a), to_unit(b))[0])

    group = [0, 2, 4]
    pairs = [(i, j) for i in group for j in group if i < j]
    expected = sum(distance(samples[i], samples[j]) for i, j in pairs) / len(pairs)
    bound = sum(scored[i]["lpips"] for i in group) / len(group)
    for i in group:
        assert scored[i]["diversity"] == pytest.approx(expected, rel=1e-4)
        assert scored[i]["diversity_bound"] == pytest.approx(bound, rel=1e-6)
    assert expected > 0
    for lone in (1, 3):  # a group of one sample, and a deterministic edit: undefined
        assert scored[lone]["diversity"] is None and scored[lone]["diversity_bound"] is None
