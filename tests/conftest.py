"""Session fixtures: a tiny random-weight SD model saved in diffusers format and loaded by path."""

from __future__ import annotations

import pytest
import torch

from pipeline.models.build import SDArchitecture, build_random_sd
from pipeline.models.loading import DiffusionModel, load_diffusion_model

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("tiny-sd")
    build_random_sd(folder, SDArchitecture(image_size=32), seed=0, unet_output_scale=0.05)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_sd(tiny_sd_path) -> DiffusionModel:
    return load_diffusion_model(tiny_sd_path)


@pytest.fixture(scope="session")
def images() -> torch.Tensor:
    """Four 32x32 RGB images with smooth structure (a blob on a gradient), uint8 (4, 32, 32, 3)."""
    generator = torch.Generator().manual_seed(0)
    grid = torch.linspace(-1, 1, 32)
    y, x = torch.meshgrid(grid, grid, indexing="ij")
    batch = []
    for index in range(4):
        center = torch.rand(2, generator=generator) - 0.5
        blob = ((x - center[0]) ** 2 + (y - center[1]) ** 2 < 0.2).float()
        color = torch.rand(3, generator=generator)
        background = (x[..., None] + 1) / 4 * torch.rand(3, generator=generator)
        image = background * (1 - blob[..., None]) + color * blob[..., None]
        batch.append((image * 255).round().to(torch.uint8))
        del index
    return torch.stack(batch)


PROMPTS = [
    "a red circle on a white background",
    "a blue square on a gray background",
    "a green star on a black background",
    "a yellow triangle on a white background",
]


@pytest.fixture(scope="session")
def prompts() -> list[str]:
    return list(PROMPTS)
