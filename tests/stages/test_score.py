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


def two_region_case(seed: int = 3):
    """A source, an edit that changes the masked square and adds noise of known size outside it."""
    rng = np.random.default_rng(seed)
    source = rng.integers(40, 200, size=(SIZE, SIZE, 3), dtype=np.uint8)
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    mask[6:18, 10:22] = True
    edit = source.copy()
    edit[mask] = 255 - edit[mask]
    edit[~mask] += rng.integers(0, 8, size=(int((~mask).sum()), 3), dtype=np.uint8)
    return source, edit, mask


def test_pie_bench_metrics_follow_their_definitions(actor):
    """bg_mse and bg_ssim over the unedited pixels (numpy, scikit-image), clip_t_edited on the edited region
    blacked outside, structure_dist 0 for an unchanged image; region metrics null without a region."""
    from skimage.metrics import structural_similarity

    source, edit, mask = two_region_case()
    full = np.ones_like(mask)
    batch = edit_batch(
        source, [(edit, mask, True), (source.copy(), mask, True), (edit, full, True), (edit, full, False)]
    )
    scored = actor(batch)
    assert scored["status"][0] == "ok", scored["failures"][0]
    changed, unchanged, whole, maskless = json.loads(scored["edits_json"][0])
    a, b = source.astype(np.float64) / 255, edit.astype(np.float64) / 255
    assert changed["bg_mse"] == pytest.approx(np.mean((a[~mask] - b[~mask]) ** 2), rel=1e-6)
    _, ssim_map = structural_similarity(a, b, channel_axis=-1, data_range=1.0, full=True)
    interior = np.zeros_like(mask)
    interior[3:-3, 3:-3] = True
    assert changed["bg_ssim"] == pytest.approx(ssim_map[~mask & interior].mean(), rel=1e-6)
    blacked = torch.from_numpy(edit * mask[..., None]).permute(2, 0, 1)[None].float() / 255
    assert changed["clip_t_edited"] == pytest.approx(
        float(actor.clip.clip_t(blacked, ["a photo of a fox"])[0]), abs=1e-6
    )
    assert changed["structure_dist"] > 0
    assert unchanged["structure_dist"] == pytest.approx(0, abs=1e-9)
    assert (unchanged["bg_mse"], unchanged["bg_ssim"]) == (0, pytest.approx(1))
    assert [whole[name] for name in ("bg_mse", "bg_ssim", "bg_psnr", "bg_lpips")] == [None] * 4
    assert whole["clip_t_edited"] is not None and whole["structure_dist"] is not None
    # No mask from the engine: no region, so no region metrics (the all-True stand-in mask is not one).
    assert maskless["clip_t_edited"] is None and maskless["bg_mse"] is None
    assert maskless["clip_t"] == pytest.approx(whole["clip_t"])


def test_composite_keeps_the_source_outside_the_mask_and_is_scored_again(job_assets):
    """output.composite: the composite equals the source exactly outside the mask (no dilation or feather
    here), so its background metrics are perfect while the raw edit's are not; an edit without a mask is
    not composited and says so."""
    from pipeline.config import OutputConfig
    from pipeline.stages.rows import COMPOSITE_IMAGES

    output = OutputConfig("unused", composite=True, composite_dilation=0, composite_feather=0)
    actor = ScoreActor(metrics_config(job_assets), output)
    source, edit, mask = two_region_case()
    scored = actor(edit_batch(source, [(edit, mask, True), (edit, np.ones_like(mask), False)]))
    assert scored["status"][0] == "ok", scored["failures"][0]
    composited, maskless = json.loads(scored["edits_json"][0])
    images = scored[COMPOSITE_IMAGES][0]
    assert np.array_equal(images[0], np.where(mask[..., None], edit, source))
    assert composited["composited"] is True
    assert (composited["composite_bg_mse"], composited["composite_bg_psnr"]) == (0, math.inf)
    assert composited["bg_mse"] > 0 and composited["bg_psnr"] < math.inf
    assert composited["composite_clip_t_edited"] == pytest.approx(composited["clip_t_edited"], abs=1e-6)
    assert maskless["composited"] is False
    assert all(maskless[f"composite_{name}"] is None for name in ("clip_t", "bg_mse", "structure_dist"))
    assert np.array_equal(images[1], edit)


def test_without_composite_nothing_is_composited(actor):
    from pipeline.stages.rows import COMPOSITE_IMAGES

    source, edit, mask = two_region_case()
    scored = actor(edit_batch(source, [(edit, mask, True)]))
    [record] = json.loads(scored["edits_json"][0])
    assert record["composited"] is False and record["composite_bg_mse"] is None
    assert np.array_equal(scored[COMPOSITE_IMAGES][0][0], edit)
