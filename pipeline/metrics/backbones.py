"""The names of the metric backbones a job scores with, as recorded with its edits."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.config import MetricsConfig


def backbone_names(metrics: MetricsConfig) -> dict[str, str]:
    """The metric backbones recorded in every edit's params and in the manifest.

    Args:
        metrics: the job's metrics config.

    Returns:
        clip: "MODEL/CHECKPOINT" ("random-init" without a checkpoint), perceptual: the perceptual
        backbone, structure: the tokens structure_dist compares (the CLIP vision tower's patch
        tokens), and classifier: the classifier reference when one is configured.
    """
    clip = metrics.clip
    clip_name = f"{clip.model_name}/{clip.pretrained or 'random-init'}"
    names = {
        "clip": clip_name,
        "perceptual": metrics.perceptual,
        "structure": f"{clip_name}:patch-tokens",
    }
    if metrics.classifier is not None:
        names["classifier"] = metrics.classifier
    return names
