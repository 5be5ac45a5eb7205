"""Pixel metrics: PSNR and SSIM per image, over all pixels or over the pixels of a mask.

Images are float tensors (B, 3, H, W) with values in [0, 1]; data range is therefore 1.

    MSE  = mean over the counted pixels and the 3 channels of (a - b)^2
    PSNR = 10 log10(1 / MSE)

SSIM is scikit-image's `structural_similarity` (7x7 uniform window, K1 = 0.01, K2 = 0.03,
data_range = 1, channels averaged). skimage averages its SSIM map only over pixels at least
3 pixels (half the window) from the border; the masked SSIM does the same, so an all-True mask
gives exactly skimage's value.

Masks are bool (B, H, W), True = counted (e.g. the non-edited region). A mask that selects no
pixel of an image gives NaN for that image rather than an error, so one empty edit mask in a
batch never fails the others. Identical images give PSNR = +inf and SSIM = 1.
"""

from __future__ import annotations

import numpy as np
import torch
from skimage.metrics import structural_similarity

from pipeline.metrics.validation import check_image_pair, check_mask, masked_spatial_mean

SSIM_WINDOW = 7  # skimage's default win_size for non-Gaussian SSIM


def mse(images_a: torch.Tensor, images_b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error per image pair, over the counted pixels and the 3 channels.

    Args:
        images_a: (B, 3, H, W) float images in [0, 1].
        images_b: (B, 3, H, W) float images in [0, 1].
        mask: (B, H, W) bool, True = pixel counted; None counts every pixel.

    Returns:
        (B,) float64 MSE; 0 for identical images, NaN where the mask is empty.
    """
    check_image_pair(images_a, images_b)
    check_mask(mask, images_a)
    # float64 so that tiny errors of near-identical images are not rounded to zero.
    squared_error = (images_a.double() - images_b.double()) ** 2
    return masked_spatial_mean(squared_error, mask)


def psnr(images_a: torch.Tensor, images_b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB for each image pair (data range 1).

    Args:
        images_a: (B, 3, H, W) float images in [0, 1].
        images_b: (B, 3, H, W) float images in [0, 1].
        mask: (B, H, W) bool, True = pixel counted; None counts every pixel.

    Returns:
        (B,) float64 PSNR; +inf for identical images, NaN where the mask is empty.
    """
    return 10.0 * torch.log10(1.0 / mse(images_a, images_b, mask))


def ssim(images_a: torch.Tensor, images_b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Structural similarity per image pair (scikit-image, data range 1, channels averaged).

    Args:
        images_a: (B, 3, H, W) float images in [0, 1], H and W at least 7.
        images_b: (B, 3, H, W) float images in [0, 1].
        mask: (B, H, W) bool, True = pixel counted; None counts every pixel. Pixels within 3 of
            the border are never counted (as in skimage's mean SSIM).

    Returns:
        (B,) float64 SSIM on the device of `images_a`; 1 for identical images, NaN where the
        mask selects no interior pixel.
    """
    check_image_pair(images_a, images_b)
    check_mask(mask, images_a)
    height, width = images_a.shape[2:]
    if min(height, width) < SSIM_WINDOW:
        raise ValueError(
            f"ssim needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels (its window size), "
            f"got {height}x{width}; upscale the images or leave SSIM out for them"
        )
    # skimage works on (H, W, C) numpy arrays on the CPU.
    arrays_a = images_a.detach().double().permute(0, 2, 3, 1).cpu().numpy()
    arrays_b = images_b.detach().double().permute(0, 2, 3, 1).cpu().numpy()
    masks = None if mask is None else mask.cpu().numpy()
    values = [
        _ssim_one(arrays_a[index], arrays_b[index], None if masks is None else masks[index])
        for index in range(len(arrays_a))
    ]
    return torch.tensor(values, dtype=torch.float64, device=images_a.device)


def _ssim_one(image_a: np.ndarray, image_b: np.ndarray, mask: np.ndarray | None) -> float:
    """SSIM of one (H, W, 3) pair; with a (H, W) mask, the masked mean of the interior SSIM map."""
    if mask is None:
        return float(structural_similarity(image_a, image_b, channel_axis=-1, data_range=1.0))
    _, ssim_map = structural_similarity(image_a, image_b, channel_axis=-1, data_range=1.0, full=True)
    pad = (SSIM_WINDOW - 1) // 2
    interior = np.zeros_like(mask)
    interior[pad:-pad, pad:-pad] = True
    counted = mask & interior
    if not counted.any():
        return float("nan")
    return float(ssim_map[counted].mean())
