"""Structure distance (Tumanyan et al., Splicing ViT; PIE-Bench's "structure distance"; StyleDiffusion
Table 2): how far two images' layouts are apart, whatever their appearance.

Legend:

    t_1 .. t_n        the patch tokens of the last layer of a frozen ViT (here the configured CLIP
                      vision tower; the papers use DINO-ViT's keys)
    S(x)_ij           cos(t_i, t_j), the tokens' self-similarity matrix (n x n)
    distance(x, y)    mean over i, j of (S(x)_ij - S(y)_ij)^2

The edits table's `structure_dist` takes t_1 .. t_n from `ClipScorer.image_tokens` without its CLS
token (`patch_tokens`), so its backbone is the configured CLIP's vision tower (recorded as
params.metrics.structure). PIE-Bench reports it x 1e3.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def self_similarity(tokens: torch.Tensor) -> torch.Tensor:
    """S(x) = cosine similarity of every pair of tokens.

    Args:
        tokens: (B, n, D).

    Returns:
        (B, n, n).
    """
    unit = F.normalize(tokens.float(), dim=-1)
    return unit @ unit.transpose(1, 2)


def patch_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """The patch tokens t_1 .. t_n of a ViT's (B, 1 + n, D) output, CLS first -> (B, n, D)."""
    return tokens[:, 1:]


def structure_distance(tokens_a: torch.Tensor, tokens_b: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the self-similarity matrices of two images' patch tokens.

    Args:
        tokens_a: (B, n, D) patch tokens of the first images.
        tokens_b: (B, n, D) patch tokens of the second images (same backbone).

    Returns:
        (B,) distances, 0 for identical layouts.
    """
    if tokens_a.shape != tokens_b.shape:
        raise ValueError(f"token shapes differ: {tuple(tokens_a.shape)} vs {tuple(tokens_b.shape)}")
    return (self_similarity(tokens_a) - self_similarity(tokens_b)).pow(2).flatten(1).mean(dim=1)
