"""Oracle attribute classifier for the shapes world (evaluation only, never a training signal).

A small CNN with three heads that read the primary object's shape and colour and the background of a
one-object scene. `features` exposes its intermediate feature maps for a perceptual distance.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from pipeline.world.generator import BACKGROUNDS, COLORS, SHAPES

HEADS = {"shape": SHAPES, "color": tuple(COLORS), "background": BACKGROUNDS}


class ShapesOracle(nn.Module):
    """CNN: four strided conv stages (64 -> 32 -> 16 -> 8 -> 4 pixels), global pooling, one linear head each.

    Args:
        widths: channels of the four stages.
    """

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 64)) -> None:
        super().__init__()
        self.widths = tuple(int(width) for width in widths)
        stages = []
        in_channels = 3
        for width in self.widths:
            stages.append(
                nn.Sequential(
                    # Strided first conv: each stage halves the resolution at a fraction of the cost.
                    nn.Conv2d(in_channels, width, 3, stride=2, padding=1),
                    nn.GroupNorm(8, width),
                    nn.SiLU(),
                    nn.Conv2d(width, width, 3, padding=1),
                    nn.GroupNorm(8, width),
                    nn.SiLU(),
                )
            )
            in_channels = width
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleDict(
            {name: nn.Linear(in_channels, len(values)) for name, values in HEADS.items()}
        )

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Intermediate feature maps.

        Args:
            images: (B, 3, 64, 64) in [-1, 1].

        Returns:
            One map per stage: (B, widths[i], 64 / 2**(i+1), 64 / 2**(i+1)).
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"oracle expects images (B, 3, H, W) in [-1, 1], got shape {tuple(images.shape)}"
            )
        maps = []
        hidden = images
        for stage in self.stages:
            hidden = stage(hidden)
            maps.append(hidden)
        return maps

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per head: {'shape': (B, 4), 'color': (B, 6), 'background': (B, 6)}."""
        pooled = self.features(images)[-1].mean(dim=(2, 3))
        return {name: head(pooled) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, list[str]]:
        """Predicted attribute names per image, e.g. {'shape': ['star', ...], ...}."""
        logits = self(images)
        return {name: [HEADS[name][index] for index in logits[name].argmax(dim=1).tolist()] for name in HEADS}

    def save(self, folder: str | os.PathLike) -> None:
        """Write oracle.safetensors and oracle.json (widths) to `folder`."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(
            {key: value.contiguous() for key, value in self.state_dict().items()},
            folder / "oracle.safetensors",
        )
        (folder / "oracle.json").write_text(
            json.dumps({"widths": list(self.widths), "heads": HEADS}, indent=2)
        )


def images_to_tensor(images) -> torch.Tensor:
    """uint8 images (B, 64, 64, 3) (numpy or torch) -> float (B, 3, 64, 64) in [-1, 1]."""
    tensor = torch.as_tensor(images)
    if tensor.dtype != torch.uint8 or tensor.ndim != 4 or tensor.shape[-1] != 3:
        raise ValueError(f"expected uint8 images (B, H, W, 3), got {tensor.dtype} {tuple(tensor.shape)}")
    return tensor.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def load_oracle(folder: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> ShapesOracle:
    """Load the trained oracle (default: the one shipped in pipeline/world/assets)."""
    from safetensors.torch import load_file

    folder = Path(folder) if folder is not None else Path(__file__).parent / "assets"
    weights, config = folder / "oracle.safetensors", folder / "oracle.json"
    if not weights.is_file() or not config.is_file():
        raise FileNotFoundError(
            f"no oracle in {folder} (needs oracle.safetensors and oracle.json); "
            "train one with `python -m pipeline.world.train oracle`"
        )
    oracle = ShapesOracle(tuple(json.loads(config.read_text())["widths"]))
    oracle.load_state_dict(load_file(weights))
    return oracle.to(device).eval()


class OracleFeatures(nn.Module):
    """The oracle's feature maps for images in [0, 1]: the shapes world's perceptual backbone.

    `pipeline.metrics.build_perceptual("features:shapes-oracle", feature_extractor=...)` feeds [0, 1]
    images; the oracle was trained on [-1, 1].
    """

    def __init__(self, oracle: ShapesOracle) -> None:
        super().__init__()
        self.oracle = oracle.requires_grad_(False)

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.oracle.features(images * 2.0 - 1.0)


def perceptual_features() -> OracleFeatures:
    """Factory for job specs: `metrics.feature_extractor: pipeline.world.oracle:perceptual_features`."""
    return OracleFeatures(load_oracle())


class ShapeClassifier(nn.Module):
    """The oracle's shape head as a metrics classifier: images (B, 3, H, W) in [0, 1] -> B shape names."""

    def __init__(self, oracle: ShapesOracle) -> None:
        super().__init__()
        self.oracle = oracle.requires_grad_(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[str]:
        return self.oracle.predict(images * 2.0 - 1.0)["shape"]


def shape_classifier() -> ShapeClassifier:
    """Factory for job specs: `metrics.classifier: pipeline.world.oracle:shape_classifier`."""
    return ShapeClassifier(load_oracle())
