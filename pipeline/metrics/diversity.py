"""Diversity of stochastic edits (Park et al., eq. 5), and the spread of one attribute over edits.

Legend:

    I               the source image
    I'_1 .. I'_K    K sampled edits of I with one edit prompt
    diversity       (2 / (K (K - 1))) sum_{i < j} d(I'_i, I'_j), d a perceptual distance (LPIPS);
                    higher is more diverse
    bound           (1 / K) sum_k d(I, I'_k): the edits' distance to the source, eq. 5's upper bound
                    LPIPS(I, I') >= LPIPS(I', I'')
    p_n             a classifier's probabilities (K classes) of one attribute in edit n of N (e.g. the
                    colour of the object each of N images was edited to with one reference)
    spread          sum_k Var_n(p_nk) = (1 / N) sum_n ||p_n - mean_n p_n||^2: 0 when every edit is read
                    alike; lower is more consistent (ZIP's Fig. 5: one reference, one style everywhere)
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


def attribute_spread(probabilities: torch.Tensor) -> float:
    """Total variance of an attribute's class probabilities over N edits, about their mean.

    Unlike the spread of one class's probability, it counts edits that vary among the other classes (a
    red, a green and a blue edit are not consistent because none is purple); for one-hot readings it is
    the Gini impurity 1 - sum_k (share of edits read as k)^2.

    Args:
        probabilities: (N, K), each row a distribution over the K values of the attribute.
    """
    if probabilities.ndim != 2 or probabilities.shape[0] == 0:
        raise ValueError(
            f"attribute_spread: probabilities must be (N, K) with N >= 1, got {tuple(probabilities.shape)}"
        )
    centred = probabilities.double() - probabilities.double().mean(0)
    return float(centred.square().sum(1).mean())
