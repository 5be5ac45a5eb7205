"""Filter flags: an edit passes when every configured threshold holds (and, with
filter.require_target_class, when metrics.classifier reads it as its target class). The thresholds
apply to the raw edit's metrics, not to the composite_* ones."""

from __future__ import annotations

import json

from pipeline.config import FilterConfig
from pipeline.stages.rows import EDITS_JSON

# (config attribute, metric, comparison): "min" requires value >= threshold, "max" value <= threshold.
_RULES = (
    ("min_clip_t", "clip_t", "min"),
    ("min_clip_dir", "clip_dir", "min"),
    ("min_clip_i", "clip_i", "min"),
    ("max_lpips", "lpips", "max"),
    ("min_bg_psnr", "bg_psnr", "min"),
    ("max_bg_lpips", "bg_lpips", "max"),
    ("min_bg_ssim", "bg_ssim", "min"),
    ("min_clip_t_edited", "clip_t_edited", "min"),
    ("max_structure_dist", "structure_dist", "max"),
)


def filter_reason(metrics: dict, thresholds: FilterConfig) -> str | None:
    """The failed thresholds of one edit joined by '; ', or None when it passes.

    A metric that is undefined (None) fails any threshold set on it; with require_target_class the
    edit fails unless its classified_as equals its target_class.
    """
    reasons = []
    for attribute, metric, kind in _RULES:
        threshold = getattr(thresholds, attribute)
        if threshold is None:
            continue
        value = metrics.get(metric)
        if value is None:
            reasons.append(f"{metric} undefined")
        elif kind == "min" and value < threshold:
            reasons.append(f"{metric}<{threshold:g}")
        elif kind == "max" and value > threshold:
            reasons.append(f"{metric}>{threshold:g}")
    if thresholds.require_target_class and metrics.get("classified_as") != metrics.get("target_class"):
        reasons.append(f"classified_as={metrics.get('classified_as')}")
    return "; ".join(reasons) if reasons else None


def filter_batch(batch: dict, thresholds: FilterConfig) -> dict:
    """Ray Data map_batches function: set passed_filter / filter_reason on every edit in edits_json."""
    edits_json = batch[EDITS_JSON].astype(object).copy()
    for row, text in enumerate(edits_json):
        records = json.loads(text)
        for record in records:
            record["filter_reason"] = filter_reason(record, thresholds)
            record["passed_filter"] = record["filter_reason"] is None
        edits_json[row] = json.dumps(records)
    return {**batch, EDITS_JSON: edits_json}
