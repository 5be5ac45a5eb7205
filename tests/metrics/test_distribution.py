"""FID and KID through torchmetrics with a custom feature extractor, against closed forms computed here
with numpy / scipy on the same features."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import linalg

from pipeline.metrics.distribution import (
    ImageFeatures,
    frechet_distance,
    kernel_distance,
    pooled_feature_maps,
)


def channel_means() -> ImageFeatures:
    """f(x) = the image's mean colour: features whose values the test sets directly."""
    return ImageFeatures(lambda images: images.mean(dim=(2, 3)), 3, "channel-means")


def solid_images(colours: np.ndarray, size: int = 4) -> torch.Tensor:
    """(N, 3) colours in [0, 1] -> (N, 3, size, size) images of those colours."""
    return torch.from_numpy(colours).float()[:, :, None, None].expand(-1, -1, size, size).contiguous()


def gaussian_colours(
    rng: np.random.Generator, count: int, mean: list[float], scale: list[float]
) -> np.ndarray:
    mixing = rng.normal(size=(3, 3)) * np.array(scale)[:, None]
    return np.clip(np.array(mean) + rng.normal(size=(count, 3)) @ mixing.T * 0.05, 0, 1)


def frechet_by_formula(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 sqrtm(S_a S_b)), unbiased covariances, scipy's sqrtm."""
    mean_a, mean_b = features_a.mean(axis=0), features_b.mean(axis=0)
    cov_a, cov_b = np.cov(features_a, rowvar=False), np.cov(features_b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def kid_by_formula(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Unbiased MMD^2 with k(x, y) = (x.y / D + 1)^3 over the whole sets."""
    dimension = features_a.shape[1]
    kernel = lambda x, y: (x @ y.T / dimension + 1) ** 3  # noqa: E731
    k_aa, k_bb, k_ab = (
        kernel(features_a, features_a),
        kernel(features_b, features_b),
        kernel(features_a, features_b),
    )
    m = len(features_a)
    within = (k_aa.sum() - np.trace(k_aa) + k_bb.sum() - np.trace(k_bb)) / (m * (m - 1))
    return float(within - 2 * k_ab.mean())


def test_fid_equals_the_frechet_distance_of_the_feature_gaussians():
    rng = np.random.default_rng(0)
    real = gaussian_colours(rng, 300, [0.4, 0.5, 0.6], [1.0, 0.5, 2.0])
    fake = gaussian_colours(rng, 200, [0.5, 0.45, 0.6], [2.0, 1.0, 0.5])
    features = channel_means()
    value = frechet_distance(solid_images(real), solid_images(fake), features, batch_size=64)
    # The features are the colours (float32 on the way through the images).
    expected = frechet_by_formula(
        real.astype(np.float32).astype(np.float64), fake.astype(np.float32).astype(np.float64)
    )
    assert value == pytest.approx(expected, rel=1e-3, abs=1e-7)
    assert value > 0.005  # the two sets differ in mean and covariance


def test_fid_is_zero_for_one_set_and_the_squared_shift_for_a_translated_one():
    rng = np.random.default_rng(1)
    real = gaussian_colours(rng, 100, [0.5, 0.5, 0.5], [1.0, 1.0, 1.0])
    features = channel_means()
    assert frechet_distance(solid_images(real), solid_images(real), features) == pytest.approx(0, abs=1e-7)
    shift = np.array([0.1, -0.05, 0.02])
    # Same covariance, means apart by the shift: FID = ||shift||^2.
    shifted = frechet_distance(solid_images(real), solid_images(real + shift), features)
    assert shifted == pytest.approx(float((shift**2).sum()), rel=1e-3)


def test_kid_equals_the_unbiased_polynomial_mmd_and_is_seeded():
    rng = np.random.default_rng(2)
    real = gaussian_colours(rng, 40, [0.4, 0.5, 0.6], [1.0, 1.0, 1.0])
    fake = gaussian_colours(rng, 40, [0.7, 0.5, 0.3], [1.0, 1.0, 1.0])
    features = channel_means()
    # One subset of all 40 features: the draw only permutes them, and the MMD does not depend on order.
    mean, std = kernel_distance(solid_images(real), solid_images(fake), features, subset_size=40, subsets=1)
    expected = kid_by_formula(
        real.astype(np.float32).astype(np.float64), fake.astype(np.float32).astype(np.float64)
    )
    assert mean == pytest.approx(expected, rel=1e-4)
    assert std == 0
    same = kernel_distance(solid_images(real), solid_images(real), features, subset_size=40, subsets=1)[0]
    assert abs(same) < 0.1 * mean
    draws = []
    for global_seed in (0, 1):  # whatever the global generator's state, the seed decides the draws
        torch.manual_seed(global_seed)
        draws.append(
            kernel_distance(
                solid_images(real), solid_images(fake), features, subset_size=10, subsets=5, seed=7
            )
        )
    assert draws[0] == draws[1]


def test_pooled_feature_maps_average_each_layer_over_space():
    class TwoLayers(torch.nn.Module):
        def features(self, images):
            return [images, images[:, :2, ::2, ::2] * 2]

    features = pooled_feature_maps(TwoLayers(), "two-layers", probe_size=8)
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = torch.cat([images.mean(dim=(2, 3)), images[:, :2, ::2, ::2].mean(dim=(2, 3)) * 2], dim=1)
    assert features.num_features == 5
    torch.testing.assert_close(features(images), expected)


def test_too_few_images_are_refused_with_the_reason():
    features = channel_means()
    one = solid_images(np.full((1, 3), 0.5))
    with pytest.raises(ValueError, match="at least 2 real images"):
        frechet_distance(one, solid_images(np.full((3, 3), 0.5)), features)
    with pytest.raises(ValueError, match="KID needs at least 2"):
        kernel_distance(one, one, features)
