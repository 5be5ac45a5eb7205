"""Edit metrics as pure tensor code: pixel (MSE, PSNR, SSIM), perceptual (LPIPS), CLIP scores,
structure distance and diversity per image; FID / KID per image set (`pipeline.metrics.distribution`).

All take images as float (B, 3, H, W) tensors in [0, 1]; the per-image metrics return one value per
image (B,).
"""

from pipeline.metrics.clip import (
    ClipScorer,
    RandomClip,
    build_random_clip,
    register_model_config,
    tiny_clip_config,
)
from pipeline.metrics.perceptual import (
    FeatureDistanceMap,
    LpipsDistanceMap,
    PerceptualDistance,
    build_perceptual,
)
from pipeline.metrics.pixel import mse, psnr, ssim

__all__ = [
    "ClipScorer",
    "FeatureDistanceMap",
    "LpipsDistanceMap",
    "PerceptualDistance",
    "RandomClip",
    "build_perceptual",
    "build_random_clip",
    "mse",
    "psnr",
    "register_model_config",
    "ssim",
    "tiny_clip_config",
]
