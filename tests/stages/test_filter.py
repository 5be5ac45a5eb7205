"""Filter flags: thresholds and the classifier check, against hand-written metric records."""

from __future__ import annotations

import json

import numpy as np

from pipeline.config import FilterConfig
from pipeline.stages.filter import filter_batch, filter_reason


def test_thresholds_name_every_failed_metric_and_undefined_fails():
    thresholds = FilterConfig(min_clip_t=0.2, max_lpips=0.5, min_bg_psnr=20.0)
    assert filter_reason({"clip_t": 0.3, "lpips": 0.1, "bg_psnr": 25.0}, thresholds) is None
    assert filter_reason({"clip_t": 0.1, "lpips": 0.7, "bg_psnr": None}, thresholds) == (
        "clip_t<0.2; lpips>0.5; bg_psnr undefined"
    )
    # Unset thresholds are not checked, whatever the value.
    assert filter_reason({"clip_t": -1.0, "clip_i": -1.0}, FilterConfig()) is None


def test_pie_bench_thresholds_keep_their_direction():
    """bg_ssim and clip_t_edited are similarities (a minimum), structure_dist a distance (a maximum)."""
    thresholds = FilterConfig(min_bg_ssim=0.9, min_clip_t_edited=0.2, max_structure_dist=0.01)
    good = {"bg_ssim": 0.95, "clip_t_edited": 0.3, "structure_dist": 0.005}
    assert filter_reason(good, thresholds) is None
    bad = {"bg_ssim": 0.85, "clip_t_edited": 0.1, "structure_dist": 0.02}
    assert filter_reason(bad, thresholds) == "bg_ssim<0.9; clip_t_edited<0.2; structure_dist>0.01"
    assert filter_reason({**good, "clip_t_edited": None}, thresholds) == "clip_t_edited undefined"


def test_require_target_class_compares_the_classifier_reading_with_the_target():
    thresholds = FilterConfig(require_target_class=True)
    assert filter_reason({"target_class": "star", "classified_as": "star"}, thresholds) is None
    assert filter_reason({"target_class": "star", "classified_as": "circle"}, thresholds) == (
        "classified_as=circle"
    )
    assert filter_reason({"target_class": "star", "classified_as": None}, thresholds) == "classified_as=None"
    # Without the flag the reading is recorded but does not decide.
    assert filter_reason({"target_class": "star", "classified_as": "circle"}, FilterConfig()) is None


def test_filter_batch_flags_every_edit_of_every_row():
    records = [
        [{"target_class": "star", "classified_as": "star", "clip_t": 0.3}],
        [
            {"target_class": "star", "classified_as": "square", "clip_t": 0.3},
            {"target_class": "star", "classified_as": "star", "clip_t": 0.1},
        ],
    ]
    batch = {"edits_json": np.array([json.dumps(r) for r in records], dtype=object)}
    flagged = filter_batch(batch, FilterConfig(min_clip_t=0.2, require_target_class=True))
    first, second = (json.loads(text) for text in flagged["edits_json"])
    assert [e["passed_filter"] for e in first + second] == [True, False, False]
    assert [e["filter_reason"] for e in second] == ["classified_as=square", "clip_t<0.2"]
