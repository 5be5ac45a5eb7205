"""Distribution-level metrics of image sets: FID and KID (torchmetrics) with a configurable feature
extractor instead of InceptionV3, so that a world with its own trained networks (the shapes world's
oracle or CLIP) is measured in its own feature space.

Legend (Heusel et al. 2017; Bińkowski et al. 2018), with f(x) in R^D the features of image x:

    mu_r, S_r        mean and covariance of f over the real images, mu_g, S_g over the generated ones
    FID              ||mu_r - mu_g||^2 + tr(S_r + S_g - 2 (S_r S_g)^(1/2))
    k(x, y)          (<x, y> / D + 1)^3, KID's polynomial kernel
    KID              unbiased MMD^2 of k between random subsets of the two sets (mean and std over
                     `subsets` draws of `subset_size` features from each set)

These are properties of sets, not of one edit: they belong in a job's summary or a benchmark
(`benchmarks/distribution_metrics.py` compares each target class's edits with the real sources of that
class), not in the edits table. Values are only comparable under the same feature extractor; the
extractor's name is returned with them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from pipeline.metrics.validation import check_images


class ImageFeatures(nn.Module):
    """A feature extractor in torchmetrics' form: images (B, 3, H, W) in [0, 1] -> (B, D) features.

    Attributes:
        name: the extractor's name, recorded with the metrics ("features:shapes-oracle", "clip:...").
        num_features: D (read by torchmetrics instead of probing with a dummy image).
    """

    def __init__(
        self,
        embed: Callable[[torch.Tensor], torch.Tensor],
        num_features: int,
        name: str,
        network: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.embed = embed
        # Registered so that torchmetrics' .to(device) moves the network `embed` runs.
        self.network = network
        self.num_features = num_features
        self.name = name

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images)
        features = self.embed(images)
        if features.ndim != 2 or features.shape[1] != self.num_features:
            raise ValueError(
                f"feature extractor {self.name} returned shape {tuple(features.shape)}; expected "
                f"(B, {self.num_features})"
            )
        return features.float()


def pooled_feature_maps(extractor: nn.Module, name: str, probe_size: int = 64) -> ImageFeatures:
    """Features of a perceptual feature extractor (`features(images) -> list of (B, C_l, H_l, W_l)`, as
    `metrics.feature_extractor` gives): each layer's maps averaged over space, concatenated.

    Args:
        extractor: the module (e.g. `pipeline.world.oracle.perceptual_features()`).
        name: recorded with the metrics.
        probe_size: side of the blank image used once to find D.
    """

    def embed(images: torch.Tensor) -> torch.Tensor:
        return torch.cat([layer.mean(dim=(2, 3)) for layer in extractor.features(images)], dim=1)

    with torch.no_grad():
        probe = torch.zeros(1, 3, probe_size, probe_size, device=_device_of(extractor))
        num_features = embed(probe).shape[1]
    return ImageFeatures(embed, num_features, name, network=extractor)


def clip_image_features(scorer) -> ImageFeatures:
    """Unit-norm CLIP image embeddings of a `pipeline.metrics.ClipScorer` (its configured backbone)."""
    num_features = scorer.image_embeddings(torch.zeros(1, 3, *scorer.image_size)).shape[1]
    return ImageFeatures(scorer.image_embeddings, num_features, f"clip:{scorer.backbone}", scorer.model)


def _device_of(module: nn.Module) -> torch.device:
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _batches(images: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, len(images), batch_size):
        yield images[start : start + batch_size]


def frechet_distance(
    real: torch.Tensor, generated: torch.Tensor, features: ImageFeatures, batch_size: int = 64
) -> float:
    """FID between two image sets in `features`' space (torchmetrics' FrechetInceptionDistance).

    Args:
        real: (N, 3, H, W) in [0, 1], N >= 2.
        generated: (M, 3, H', W') in [0, 1], M >= 2.
        features: the extractor.
        batch_size: images per extractor call.
    """
    for images, what in ((real, "real"), (generated, "generated")):
        if len(images) < 2:
            raise ValueError(f"FID needs at least 2 {what} images (a covariance), got {len(images)}")
    metric = FrechetInceptionDistance(feature=features, normalize=True)
    for images, is_real in ((real, True), (generated, False)):
        for batch in _batches(images, batch_size):
            metric.update(batch, real=is_real)
    return float(metric.compute())


def kernel_distance(
    real: torch.Tensor,
    generated: torch.Tensor,
    features: ImageFeatures,
    subset_size: int = 1000,
    subsets: int = 100,
    seed: int = 0,
    batch_size: int = 64,
) -> tuple[float, float]:
    """KID (mean, std over subsets) between two image sets (torchmetrics' KernelInceptionDistance).

    Args:
        real: (N, 3, H, W) in [0, 1].
        generated: (M, 3, H', W') in [0, 1].
        features: the extractor.
        subset_size: features per subset, capped at min(N, M) (KID needs >= 2).
        subsets: subset draws.
        seed: seeds the draws, so the value is reproducible.
        batch_size: images per extractor call.
    """
    size = min(subset_size, len(real), len(generated))
    if size < 2:
        raise ValueError(f"KID needs at least 2 images in each set, got {len(real)} and {len(generated)}")
    with warnings.catch_warnings():  # that it keeps every feature in memory is what KID needs
        warnings.filterwarnings("ignore", message=".*save all extracted features.*", category=UserWarning)
        metric = KernelInceptionDistance(feature=features, subsets=subsets, subset_size=size, normalize=True)
    for images, is_real in ((real, True), (generated, False)):
        for batch in _batches(images, batch_size):
            metric.update(batch, real=is_real)
    with torch.random.fork_rng(devices=[]):  # torchmetrics draws the subsets from the global generator
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)
