"""Ground-truth-referenced edit error: an edited image against the counterfactual render of its scene.

In the shapes world the perfect edit of every scene is known: the generator renders the same layout
and texture with one attribute changed. Legend:

    x_src       the source scene's image (uint8 H x W x 3)
    x_gt        `generator.counterfactual(scene, attribute, value)`, the ground-truth edit
    x_edit      the method's edited image
    R           `changed`: pixels where x_gt may differ from x_src (union of the edited object's old and
                new silhouettes; for a background edit, everything outside the objects)
    PSNR_all    PSNR(x_edit, x_gt) over the image
    PSNR_R      PSNR(x_edit, x_gt) inside R: did the edit draw the right thing
    PSNR_~R     PSNR(x_edit, x_gt) outside R (= PSNR(x_edit, x_src) there): did the rest stay put
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.metrics.pixel import psnr
from pipeline.world import generator


@dataclass(frozen=True)
class GroundTruthEdit:
    """One edit whose perfect result is known.

    Attributes:
        source: the rendered source scene.
        target: the rendered counterfactual (the ground-truth edit).
        attribute: 'shape', 'color' or 'background'.
        value: the attribute's new value.
        changed: (H, W) bool, the region R where target may differ from source.
    """

    source: generator.RenderedScene
    target: generator.RenderedScene
    attribute: str
    value: str
    changed: np.ndarray


def ground_truth_edit(scene: generator.Scene, attribute: str, value: str) -> GroundTruthEdit:
    """Render `scene`, its counterfactual with `attribute` := `value`, and the region between them."""
    source = generator.render(scene)
    target = generator.counterfactual(scene, attribute, value)
    changed = ~source.masks.any(axis=0) if attribute == "background" else source.masks[0] | target.masks[0]
    return GroundTruthEdit(source, target, attribute, value, changed)


def shape_swap_edits(seeds: range, two_object_fraction: float = 0.0) -> list[GroundTruthEdit]:
    """One shape edit per seed: the primary object becomes the next shape in `generator.SHAPES`.

    Source and target captions then differ in one word, which suits word-swap (replace) editing.
    """
    edits = []
    for seed in seeds:
        scene = generator.sample_scene(seed, two_object_fraction)
        shapes = generator.SHAPES
        new_shape = shapes[(shapes.index(scene.objects[0].shape) + 1) % len(shapes)]
        edits.append(ground_truth_edit(scene, "shape", new_shape))
    return edits


def _as_unit_float(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [0, 1]."""
    return torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).double() / 255.0


def edit_error(edited: torch.Tensor | np.ndarray, edits: list[GroundTruthEdit]) -> dict[str, torch.Tensor]:
    """PSNR of each edited image against its ground truth: overall, inside R and outside R.

    Args:
        edited: (B, H, W, 3) uint8, x_edit for each of the B `edits`.
        edits: the B ground-truth edits.

    Returns:
        {"psnr_all", "psnr_changed", "psnr_unchanged"}: (B,) float64 dB each (+inf where identical).
    """
    if len(edits) != len(edited):
        raise ValueError(f"edit_error: {len(edited)} edited images for {len(edits)} ground-truth edits")
    truth = _as_unit_float(np.stack([edit.target.image for edit in edits]))
    result = _as_unit_float(edited)
    changed = torch.as_tensor(np.stack([edit.changed for edit in edits]))
    return {
        "psnr_all": psnr(result, truth),
        "psnr_changed": psnr(result, truth, changed),
        "psnr_unchanged": psnr(result, truth, ~changed),
    }
