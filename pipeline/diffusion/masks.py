"""Edit masks from cross-attention maps and Prompt-to-Prompt's local blend (§3.2 "Local editing").

Legend (P2P's `LocalBlend` in the null-text notebook):

    M                 summed cross-attention maps of one row, (q, L) with q = r*r queries at resolution r
    alpha_w           indicator of the tokens of the chosen words
    word mask         maxpool3x3( sum_w M[:, alpha_w] ) resized to the latent, / its max, > th[0]
    exclude mask      sum_w M[:, alpha_w] over `substruct_words` (no pooling), / its max, > th[1]
    mask              (word mask of the source row | word mask of the edit row)
                      & ~(exclude mask of the source row | exclude mask of the edit row)
    local blend       z_edit <- z_source + mask * (z_edit - z_source), after each step i >= start_blend
                      with start_blend = int(blend_start * S) (P2P's counter > int(0.2 * S))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def word_mask(
    maps: torch.Tensor,
    positions: list[int],
    resolution: int,
    size: int,
    threshold: float,
    pool: bool = True,
) -> torch.Tensor:
    """Binary mask of where the tokens at `positions` attend.

    Args:
        maps: (q, L) cross-attention maps of one row, q = resolution**2.
        positions: token positions of the chosen words.
        resolution: r, side of the attention layer.
        size: side of the output mask (the latent's).
        threshold: on the max-normalised map.
        pool: 3x3 max-pool before resizing (word masks: yes; exclude masks: no).

    Returns:
        (size, size) bool mask; all False when `positions` is empty.
    """
    if not positions:
        return torch.zeros(size, size, dtype=torch.bool, device=maps.device)
    word_map = maps[:, positions].sum(dim=-1).view(1, 1, resolution, resolution)
    if pool:
        word_map = F.max_pool2d(word_map, kernel_size=3, stride=1, padding=1)
    word_map = F.interpolate(word_map, size=(size, size), mode="nearest")[0, 0]
    word_map = word_map / word_map.max().clamp_min(1e-12)
    return word_map > threshold


def upsample_mask(mask: torch.Tensor, size: int) -> torch.Tensor:
    """(h, w) bool latent mask -> (size, size) bool image mask (nearest)."""
    return F.interpolate(mask[None, None].float(), size=(size, size), mode="nearest")[0, 0].bool()


@dataclass(frozen=True)
class MaskWords:
    """Token positions that define one edit's mask.

    Attributes:
        source: positions of the mask words in the source prompt.
        target: positions of the mask words in the target prompt.
        source_exclude: positions of the exclude words in the source prompt.
        target_exclude: positions of the exclude words in the target prompt.
        threshold: th[0], on the pooled word map.
        exclude_threshold: th[1], on the unpooled exclude map.
    """

    source: list[int]
    target: list[int]
    source_exclude: list[int]
    target_exclude: list[int]
    threshold: float
    exclude_threshold: float

    @property
    def empty(self) -> bool:
        return not (self.source or self.target)


def edit_mask(
    maps: torch.Tensor,
    source_row: int,
    edit_row: int,
    words: MaskWords,
    resolution: int,
    size: int,
) -> torch.Tensor:
    """(size, size) bool mask of one edit from the recorded maps (N, q, L) of its two rows."""
    mask = word_mask(maps[source_row], words.source, resolution, size, words.threshold) | word_mask(
        maps[edit_row], words.target, resolution, size, words.threshold
    )
    if words.source_exclude or words.target_exclude:
        exclude = word_mask(
            maps[source_row], words.source_exclude, resolution, size, words.exclude_threshold, pool=False
        ) | word_mask(
            maps[edit_row], words.target_exclude, resolution, size, words.exclude_threshold, pool=False
        )
        mask = mask & ~exclude
    return mask


@dataclass(frozen=True)
class LocalBlend:
    """P2P's local blend for the blended edits of one UNet batch.

    Attributes:
        edit_rows: rows of the blended edits.
        source_rows: their source rows.
        words: per blended edit, its mask words.
        start_step: first step index after which blending is applied (int(blend_start * S)).
        resolution: side of the recorded maps.
        size: the latent's side.
    """

    edit_rows: list[int]
    source_rows: list[int]
    words: list[MaskWords]
    start_step: list[int]
    resolution: int
    size: int

    def __call__(self, step_index: int, latents: torch.Tensor, maps: torch.Tensor | None) -> torch.Tensor:
        """Blend `latents` (N, C, h, w) after step `step_index` using the maps recorded so far."""
        if maps is None:
            return latents
        for edit_row, source_row, words, start in zip(
            self.edit_rows, self.source_rows, self.words, self.start_step, strict=True
        ):
            if step_index < start:
                continue
            mask = edit_mask(maps, source_row, edit_row, words, self.resolution, self.size).to(latents.dtype)
            latents[edit_row] = latents[source_row] + mask * (latents[edit_row] - latents[source_row])
        return latents


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Chebyshev dilation: every pixel within `radius` pixels (a (2r+1)^2 square) of a mask pixel.

    Args:
        mask: (B, H, W) bool.
        radius: r >= 0 in pixels.

    Returns:
        (B, H, W) bool.
    """
    if radius == 0:
        return mask
    grown = F.max_pool2d(mask[:, None].float(), kernel_size=2 * radius + 1, stride=1, padding=radius)
    return grown[:, 0] > 0


def feathered_mask(mask: torch.Tensor, dilation: int, feather: int) -> torch.Tensor:
    """The blend weight of compositing: 1 on the mask dilated by `dilation`, falling linearly to 0 over
    the next `feather` pixels, exactly 0 beyond.

        D      = dilate(mask, dilation)
        alpha  = (1 / (feather + 1)) * sum_{k=0..feather} 1[dilate(D, k)]
               = 1 - d / (feather + 1) for pixels at Chebyshev distance d <= feather from D, else 0

    Args:
        mask: (B, H, W) bool, True = edited.
        dilation: pixels added around the mask at full weight (covers the attention mask's coarse
            edges: it is upsampled from the latent's 8x coarser grid).
        feather: width in pixels of the linear ramp outside the dilated mask.

    Returns:
        (B, H, W) float32 in [0, 1]; 0 exactly outside dilate(mask, dilation + feather).
    """
    if dilation < 0 or feather < 0:
        raise ValueError(f"dilation and feather must be >= 0 pixels, got {dilation} and {feather}")
    core = dilate(mask, dilation)
    rings = [dilate(core, k).float() for k in range(feather + 1)]
    return torch.stack(rings).mean(dim=0)


def composite(
    source: torch.Tensor, edit: torch.Tensor, mask: torch.Tensor, dilation: int, feather: int
) -> torch.Tensor:
    """The edit inside its (dilated, feathered) mask, the source's exact pixels outside it.

        out = source + alpha * (edit - source),   alpha = feathered_mask(mask, dilation, feather)

    Args:
        source: (B, 3, H, W) source images, float or uint8.
        edit: (B, 3, H, W) edited images, same dtype.
        mask: (B, H, W) bool, True = edited.
        dilation: see `feathered_mask`.
        feather: see `feathered_mask`.

    Returns:
        (B, 3, H, W) in the images' dtype (uint8 blends are rounded): equal to `source` bit for bit
        where alpha = 0 and to `edit` where alpha = 1.
    """
    if source.shape != edit.shape or source.dtype != edit.dtype:
        raise ValueError(
            f"source and edit must have the same shape and dtype, got {tuple(source.shape)} {source.dtype} "
            f"and {tuple(edit.shape)} {edit.dtype}"
        )
    if mask.shape != (source.shape[0], *source.shape[2:]) or mask.dtype != torch.bool:
        raise ValueError(
            f"mask must be bool (B, H, W) matching the images, got {tuple(mask.shape)} {mask.dtype}"
        )
    alpha = feathered_mask(mask, dilation, feather)[:, None]
    blended = source.float() + alpha * (edit.float() - source.float())
    if not source.is_floating_point():
        blended = blended.round()
    blended = blended.to(source.dtype)
    # Where alpha is 0 or 1 take the pixels themselves, not a float round trip of them.
    return torch.where(alpha == 0, source, torch.where(alpha == 1, edit, blended))
