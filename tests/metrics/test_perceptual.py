import urllib.error

import lpips
import pytest
import torch
import torch.nn.functional as F
import torchvision.models._api
from torch import nn

from pipeline.metrics.perceptual import (
    FeatureDistanceMap,
    LpipsDistanceMap,
    PerceptualDistance,
    build_perceptual,
)

# lpips builds its trunks through torchvision's deprecated `pretrained=` interface.
pytestmark = pytest.mark.filterwarnings("ignore:.*(pretrained|weight enum).*:UserWarning")


class TinyFeatureNet(nn.Module):
    """Two conv layers; features at full and half resolution."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 5, 3, stride=2, padding=1)

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        first = torch.relu(self.conv1(images))
        return [first, torch.relu(self.conv2(first))]


@pytest.fixture(scope="module")
def random_trunk_lpips() -> PerceptualDistance:
    """lpips' AlexNet LPIPS with its shipped linear weights on a random trunk (nothing downloaded)."""
    torch.manual_seed(0)
    model = lpips.LPIPS(net="alex", pnet_rand=True, spatial=True, verbose=False)
    return PerceptualDistance(LpipsDistanceMap(model), "lpips-alex")


@pytest.fixture(scope="module")
def feature_distance() -> PerceptualDistance:
    return build_perceptual("features:tiny", feature_extractor=TinyFeatureNet())


def _hand_unit_weight_lpips(
    net: TinyFeatureNet, images_a: torch.Tensor, images_b: torch.Tensor
) -> torch.Tensor:
    """sum_l mean_hw sum_c (f/|f| - g/|g|)^2 with each layer upsampled to the image size first."""
    total = torch.zeros(images_a.shape[0], *images_a.shape[2:])
    for layer_a, layer_b in zip(net.features(images_a), net.features(images_b), strict=True):
        unit_a = layer_a / torch.sqrt((layer_a**2).sum(dim=1, keepdim=True)).clamp_min(1e-10)
        unit_b = layer_b / torch.sqrt((layer_b**2).sum(dim=1, keepdim=True)).clamp_min(1e-10)
        per_pixel = ((unit_a - unit_b) ** 2).sum(dim=1, keepdim=True)
        upsampled = F.interpolate(per_pixel, size=images_a.shape[2:], mode="bilinear", align_corners=False)
        total += upsampled[:, 0]
    return total.mean(dim=(1, 2))


def test_lpips_path_is_zero_on_identical_images_symmetric_and_positive(random_trunk_lpips, generator):
    images_a = torch.rand(3, 3, 64, 64, generator=generator)
    images_b = torch.rand(3, 3, 64, 64, generator=generator)
    with torch.no_grad():
        same = random_trunk_lpips(images_a, images_a)
        forward = random_trunk_lpips(images_a, images_b)
        backward = random_trunk_lpips(images_b, images_a)
    assert same.shape == (3,)
    torch.testing.assert_close(same, torch.zeros(3), atol=1e-7, rtol=0)
    torch.testing.assert_close(forward, backward)
    assert bool((forward > 0).all())
    assert random_trunk_lpips.backbone == "lpips-alex"


def test_lpips_path_unmasked_is_close_to_lpips_own_value(random_trunk_lpips, generator):
    # lpips' non-spatial value averages each layer at its own resolution; ours averages the
    # upsampled map, which differs only by bilinear edge effects.
    non_spatial = lpips.LPIPS(net="alex", pnet_rand=True, spatial=False, verbose=False)
    non_spatial.load_state_dict(random_trunk_lpips.distance_map.model.state_dict())
    images_a = torch.rand(2, 3, 64, 64, generator=generator)
    images_b = (images_a + 0.1 * torch.randn(images_a.shape, generator=generator)).clamp(0, 1)
    with torch.no_grad():
        expected = non_spatial(images_a, images_b, normalize=True).flatten()
        torch.testing.assert_close(random_trunk_lpips(images_a, images_b), expected, rtol=1e-3, atol=0)


def test_lpips_path_averages_lpips_spatial_map_over_the_mask(random_trunk_lpips, generator):
    images_a = torch.rand(2, 3, 64, 64, generator=generator)
    images_b = torch.rand(2, 3, 64, 64, generator=generator)
    mask = torch.rand(2, 64, 64, generator=generator) > 0.5
    with torch.no_grad():
        spatial_map = random_trunk_lpips.distance_map.model(
            images_a * 2 - 1, images_b * 2 - 1
        )  # lpips' [-1, 1]
        masked = random_trunk_lpips(images_a, images_b, mask)
    expected = torch.stack([spatial_map[index, 0][mask[index]].mean() for index in range(2)])
    torch.testing.assert_close(masked, expected)


def test_unit_weight_features_match_hand_computation(feature_distance, generator):
    images_a = torch.rand(2, 3, 16, 16, generator=generator)
    images_b = torch.rand(2, 3, 16, 16, generator=generator)
    with torch.no_grad():
        expected = _hand_unit_weight_lpips(
            feature_distance.distance_map.feature_extractor, images_a, images_b
        )
        torch.testing.assert_close(feature_distance(images_a, images_b), expected)
        torch.testing.assert_close(feature_distance(images_a, images_a), torch.zeros(2))
    assert feature_distance.backbone == "features:tiny"


def test_all_true_mask_equals_full_average_and_empty_mask_is_nan(feature_distance, generator):
    images_a = torch.rand(2, 3, 16, 16, generator=generator)
    images_b = torch.rand(2, 3, 16, 16, generator=generator)
    everything = torch.ones(2, 16, 16, dtype=torch.bool)
    nothing_in_second = everything.clone()
    nothing_in_second[1] = False
    with torch.no_grad():
        torch.testing.assert_close(
            feature_distance(images_a, images_b, everything), feature_distance(images_a, images_b)
        )
        values = feature_distance(images_a, images_b, nothing_in_second)
    assert torch.isfinite(values[0]) and torch.isnan(values[1])


def test_masked_average_ignores_changes_far_outside_the_mask(generator):
    # Per-pixel features (1x1 conv) make the distance map local, so pixels outside the mask cannot count.
    net = nn.Conv2d(3, 6, 1)
    net.features = lambda images: [net(images)]
    distance = PerceptualDistance(FeatureDistanceMap(net), "features:pointwise")
    images_a = torch.rand(1, 3, 16, 16, generator=generator)
    images_b = images_a.clone()
    images_b[..., 8:] = torch.rand(1, 3, 16, 8, generator=generator)
    left = torch.zeros(1, 16, 16, dtype=torch.bool)
    left[..., :8] = True
    with torch.no_grad():
        assert distance(images_a, images_b, left).item() == 0
        assert distance(images_a, images_b).item() > 0


def test_build_perceptual_rejects_bad_backbones():
    with pytest.raises(ValueError, match="unknown perceptual backbone 'lpips-resnet'"):
        build_perceptual("lpips-resnet")
    with pytest.raises(ValueError, match="needs a feature_extractor"):
        build_perceptual("features:shapes-oracle")
    with pytest.raises(ValueError, match="only for 'features:<name>'"):
        build_perceptual("lpips-alex", feature_extractor=TinyFeatureNet())
    with pytest.raises(TypeError, match="features"):
        build_perceptual("features:conv", feature_extractor=nn.Conv2d(3, 3, 1))


def test_missing_trunk_weights_name_backbone_and_fix(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    # torchvision fetches (or reads the cached copy of) ImageNet weights through this function.
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match=r"'lpips-vgg'.*[Pp]re-cache.*choose another backbone"):
        build_perceptual("lpips-vgg")


def test_bad_images_raise_clear_errors(feature_distance):
    with pytest.raises(ValueError, match="same shape"):
        feature_distance(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        feature_distance(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16) * 2)
