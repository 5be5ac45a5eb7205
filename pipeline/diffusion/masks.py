"""Edit masks from cross-attention maps (Prompt-to-Prompt's local blend, §3.2 "Local editing").

Legend:

    M                 summed cross-attention maps of one row, (q, L) with q = r*r queries at resolution r
    alpha_w           indicator of the tokens of the chosen words
    mask              maxpool3x3( sum_w M[:, alpha_w] ) resized to the latent, / its max, > threshold
    local blend       z_edit <- z_source + (mask_source | mask_edit) * (z_edit - z_source)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def word_mask(
    maps: torch.Tensor, positions: list[int], resolution: int, size: int, threshold: float
) -> torch.Tensor:
    """Binary mask of where the tokens at `positions` attend.

    Args:
        maps: (q, L) cross-attention maps of one row, q = resolution**2.
        positions: token positions of the chosen words.
        resolution: r, side of the attention layer.
        size: side of the output mask (the latent's).
        threshold: on the max-normalised map.

    Returns:
        (size, size) bool mask; all False when `positions` is empty.
    """
    if not positions:
        return torch.zeros(size, size, dtype=torch.bool, device=maps.device)
    word_map = maps[:, positions].sum(dim=-1).view(1, 1, resolution, resolution)
    word_map = F.max_pool2d(word_map, kernel_size=3, stride=1, padding=1)
    word_map = F.interpolate(word_map, size=(size, size), mode="nearest")[0, 0]
    word_map = word_map / word_map.max().clamp_min(1e-12)
    return word_map > threshold


def upsample_mask(mask: torch.Tensor, size: int) -> torch.Tensor:
    """(h, w) bool latent mask -> (size, size) bool image mask (nearest)."""
    return F.interpolate(mask[None, None].float(), size=(size, size), mode="nearest")[0, 0].bool()
