"""Input checks shared by the metrics: image batches and selection masks.

Every metric takes images as float tensors of shape (B, 3, H, W) with values in [0, 1] and an
optional boolean mask of shape (B, H, W). The checks raise `ValueError`/`TypeError` that name the
argument and say how to fix it. NaN pixels pass the range check on purpose: a NaN in one image
gives a NaN metric for that image instead of failing the whole batch.
"""

from __future__ import annotations

import torch


def check_images(images: torch.Tensor, name: str = "images") -> None:
    """Check that `images` is a float (B, 3, H, W) batch with values in [0, 1].

    Args:
        images: tensor to check.
        name: argument name used in error messages.

    Raises:
        TypeError: not a floating-point tensor.
        ValueError: wrong shape or values outside [0, 1].
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, 3, H, W), got {type(images).__name__}")
    if not images.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor with values in [0, 1], got dtype {images.dtype}; "
            "convert uint8 images with images.float() / 255"
        )
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"{name} must have shape (B, 3, H, W) (RGB, channels first), got {tuple(images.shape)}"
        )
    # Comparisons with NaN are False, so NaN pixels pass here and surface as NaN metrics.
    if bool(((images < 0) | (images > 1)).any()):
        low, high = float(images.nan_to_num(0.5).min()), float(images.nan_to_num(0.5).max())
        raise ValueError(
            f"{name} must have values in [0, 1], got range [{low:.4g}, {high:.4g}]; "
            "map [-1, 1] images with (images + 1) / 2 or clamp them first"
        )


def check_image_pair(images_a: torch.Tensor, images_b: torch.Tensor) -> None:
    """Check two image batches (B, 3, H, W) in [0, 1] of the same shape.

    Raises:
        TypeError | ValueError: see `check_images`; shapes that differ.
    """
    check_images(images_a, "images_a")
    check_images(images_b, "images_b")
    if images_a.shape != images_b.shape:
        raise ValueError(
            f"images_a and images_b must have the same shape, got {tuple(images_a.shape)} and "
            f"{tuple(images_b.shape)}; resize one batch to the other's resolution first"
        )


def check_mask(mask: torch.Tensor | None, images: torch.Tensor) -> None:
    """Check that `mask` is None or a bool (B, H, W) tensor matching `images` (B, 3, H, W).

    Raises:
        TypeError: not a bool tensor.
        ValueError: shape does not match the images.
    """
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        found = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"mask must be a bool tensor of shape (B, H, W) (True = counted), got {found}")
    expected = (images.shape[0], *images.shape[2:])
    if tuple(mask.shape) != expected:
        raise ValueError(
            f"mask must have shape (B, H, W) = {expected} to match the images, got {tuple(mask.shape)}"
        )


def masked_spatial_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of a per-pixel map over all pixels, or over the masked pixels only.

    Args:
        values: (B, C, H, W) per-pixel values; the mean runs over C, H and W.
        mask: (B, H, W) bool or None (all pixels).

    Returns:
        (B,) means; NaN for an image whose mask selects no pixel.
    """
    if mask is None:
        return values.mean(dim=(1, 2, 3))
    weights = mask[:, None].to(values.dtype).expand_as(values)
    # 0/0 = NaN marks an empty selection; where() keeps NaN pixels outside the mask out of the sum.
    total = torch.where(weights > 0, values, torch.zeros_like(values)).sum(dim=(1, 2, 3))
    return total / weights.sum(dim=(1, 2, 3))
