"""Diversity of stochastic edits (Park et al., eq. 5).

Legend:

    I               the source image
    I'_1 .. I'_K    K sampled edits of I with one edit prompt
    diversity       (2 / (K (K - 1))) sum_{i < j} d(I'_i, I'_j), d a perceptual distance (LPIPS);
                    higher is more diverse
    bound           (1 / K) sum_k d(I, I'_k): the edits' distance to the source, eq. 5's upper bound
                    LPIPS(I, I') >= LPIPS(I', I'')
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def mean_pairwise_distance(
    images: torch.Tensor, distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> float:
    """Mean of d over the K (K - 1) / 2 unordered pairs of images (K, 3, H, W); NaN for K < 2.

    Args:
        images: the K samples, float in [0, 1].
        distance: maps two (N, 3, H, W) batches to (N,) distances (a PerceptualDistance).
    """
    count = images.shape[0]
    if count < 2:
        return float("nan")
    first, second = torch.triu_indices(count, count, offset=1, device=images.device)
    return float(distance(images[first], images[second]).mean())
