"""Perceptual distance (LPIPS) per image pair, over all pixels or over the pixels of a mask.

LPIPS (Zhang et al. 2018) compares unit-normalised deep features layer by layer:

    d(x, y) = sum_l  mean_{h,w}  sum_c  w_{l,c} (f̂_l(x)_{c,h,w} - f̂_l(y)_{c,h,w})^2,
    f̂_l = f_l / ||f_l||_channels

Here every layer's map is upsampled (bilinear) to the image size before summing, giving a per-pixel
distance map (B, 1, H, W); the distance is its mean over all pixels, or over the masked pixels
only. Averaging over the non-edited region is StyleDiffusion's NS-LPIPS ("non-selected region
LPIPS", papers/002 §4). The mean of the upsampled map differs slightly from lpips' own
non-spatial value (which averages each layer at its native resolution).

Backbones (the `backbone` string is recorded with every metric):
- "lpips-alex" / "lpips-vgg" / "lpips-squeeze": the `lpips` package with its calibrated linear
  weights w_{l,c} (shipped inside the package) on a torchvision ImageNet trunk. The trunk weights
  are downloaded by torchvision at first use; pre-cache them where there is no internet.
- "features:<name>": any module with `features(images) -> list of (B, C_l, H_l, W_l)` maps (e.g. a
  domain classifier); LPIPS with unit weights w_{l,c} = 1 (lpips' "baseline" variant). The
  extractor receives the images in [0, 1] unchanged and does its own normalisation.
"""

from __future__ import annotations

import warnings

import lpips
import torch
from torch import nn

from pipeline.metrics.validation import check_image_pair, check_mask, masked_spatial_mean

LPIPS_BACKBONES = {"lpips-alex": "alex", "lpips-vgg": "vgg", "lpips-squeeze": "squeeze"}
FEATURES_PREFIX = "features:"


class LpipsDistanceMap(nn.Module):
    """Per-pixel LPIPS map from an `lpips.LPIPS` model built with `spatial=True`."""

    def __init__(self, model: lpips.LPIPS) -> None:
        super().__init__()
        if not model.spatial:
            raise ValueError("LpipsDistanceMap needs lpips.LPIPS(..., spatial=True) to get a per-pixel map")
        self.model = model.eval().requires_grad_(False)

    def forward(self, images_a: torch.Tensor, images_b: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pairs in [0, 1] -> (B, 1, H, W) distance map."""
        # normalize=True maps [0, 1] to lpips' [-1, 1] input range.
        return self.model(images_a, images_b, normalize=True)


class FeatureDistanceMap(nn.Module):
    """Per-pixel unit-weight LPIPS map over the feature maps of `feature_extractor.features`."""

    def __init__(self, feature_extractor: nn.Module) -> None:
        super().__init__()
        if not callable(getattr(feature_extractor, "features", None)):
            raise TypeError(
                f"feature_extractor ({type(feature_extractor).__name__}) needs a method "
                "features(images) returning a list of (B, C, H, W) feature maps"
            )
        self.feature_extractor = feature_extractor.eval().requires_grad_(False)

    def forward(self, images_a: torch.Tensor, images_b: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pairs in [0, 1] -> (B, 1, H, W) distance map."""
        features_a = self.feature_extractor.features(images_a)
        features_b = self.feature_extractor.features(images_b)
        if len(features_a) == 0:
            raise ValueError(
                "feature_extractor.features returned no feature maps; it must return at least one"
            )
        image_size = tuple(images_a.shape[2:])
        distance_map = 0
        for layer_a, layer_b in zip(features_a, features_b, strict=True):
            squared = (lpips.normalize_tensor(layer_a) - lpips.normalize_tensor(layer_b)) ** 2
            # Same reduction as lpips.LPIPS(lpips=False, spatial=True): channel sum, then upsample.
            distance_map = distance_map + lpips.upsample(squared.sum(dim=1, keepdim=True), out_HW=image_size)
        return distance_map


class PerceptualDistance(nn.Module):
    """LPIPS-style distance per image pair, optionally restricted to masked pixels.

    Attributes:
        backbone: name recorded with the metric ("lpips-alex", "features:shapes-oracle", ...).
        distance_map: module mapping two (B, 3, H, W) batches to a (B, 1, H, W) distance map.
    """

    def __init__(self, distance_map: nn.Module, backbone: str) -> None:
        super().__init__()
        self.distance_map = distance_map
        self.backbone = backbone

    def forward(
        self, images_a: torch.Tensor, images_b: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Distance between each pair; 0 for identical images, symmetric.

        Args:
            images_a: (B, 3, H, W) float images in [0, 1], on this module's device.
            images_b: (B, 3, H, W) float images in [0, 1].
            mask: (B, H, W) bool, True = pixel counted (NS-LPIPS: the non-edited region);
                None averages over every pixel.

        Returns:
            (B,) distances; NaN where the mask selects no pixel.
        """
        check_image_pair(images_a, images_b)
        check_mask(mask, images_a)
        return masked_spatial_mean(self.distance_map(images_a, images_b), mask)


def build_perceptual(
    backbone: str, device: str | torch.device = "cpu", feature_extractor: nn.Module | None = None
) -> PerceptualDistance:
    """Build the perceptual distance named by `backbone`.

    Args:
        backbone: "lpips-alex", "lpips-vgg", "lpips-squeeze" or "features:<name>".
        device: where the networks run.
        feature_extractor: required for "features:<name>"; a module with
            `features(images (B, 3, H, W) in [0, 1]) -> list of (B, C_l, H_l, W_l)`.

    Raises:
        ValueError: unknown backbone, or a feature extractor missing / given for an lpips backbone.
        RuntimeError: the torchvision trunk weights of an lpips backbone could not be loaded.
    """
    if backbone.startswith(FEATURES_PREFIX) and len(backbone) > len(FEATURES_PREFIX):
        if feature_extractor is None:
            raise ValueError(
                f"perceptual backbone '{backbone}' needs a feature_extractor module with a features() method; "
                "pass one to build_perceptual or choose an lpips backbone"
            )
        return PerceptualDistance(FeatureDistanceMap(feature_extractor), backbone).to(device)
    if backbone not in LPIPS_BACKBONES:
        raise ValueError(
            f"unknown perceptual backbone '{backbone}'; choose one of {sorted(LPIPS_BACKBONES)} "
            f"or '{FEATURES_PREFIX}<name>' with a feature_extractor"
        )
    if feature_extractor is not None:
        raise ValueError(
            f"perceptual backbone '{backbone}' uses its own trunk; feature_extractor is only for "
            f"'{FEATURES_PREFIX}<name>' backbones"
        )
    model = _load_lpips(backbone)
    return PerceptualDistance(LpipsDistanceMap(model), backbone).to(device)


def _load_lpips(backbone: str) -> lpips.LPIPS:
    """lpips.LPIPS with calibrated linear layers and the torchvision ImageNet trunk."""
    net = LPIPS_BACKBONES[backbone]
    try:
        with warnings.catch_warnings():
            # lpips still calls torchvision's deprecated `pretrained=` interface; nothing to act on.
            warnings.filterwarnings("ignore", message=".*(pretrained|weight enum).*", category=UserWarning)
            return lpips.LPIPS(net=net, spatial=True, verbose=False)
    except (OSError, RuntimeError) as error:  # URLError is an OSError; a bad cache file a RuntimeError
        raise RuntimeError(
            f"perceptual backbone '{backbone}' could not load torchvision's ImageNet '{net}' trunk weights "
            f"({type(error).__name__}: {error}). Pre-cache them where there is internet, e.g. "
            f"`python -c \"import lpips; lpips.LPIPS(net='{net}')\"`, and copy the files into "
            f"{torch.hub.get_dir()}/checkpoints (or set TORCH_HOME), or choose another backbone "
            f"(another lpips-* or '{FEATURES_PREFIX}<name>' with your own feature extractor)."
        ) from error
