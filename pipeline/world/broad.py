"""Scenes outside the shapes world's palette: what a VAE that "reconstructs any image" must handle.

The world's own scenes use six object colours, three grey levels and three fixed textures, always
anti-aliased. A real Stable Diffusion VAE reconstructs any image; the world's VAE is trained on its own
palette, so without these scenes it snaps colours to that palette and caps every inversion's PSNR on
anything else. Two families, both seeded (same seed, same image):

- `broad_scene`: random RGB object and background colours; solid, linear-gradient, striped, checkered
  or cloudy backgrounds in random colours; one to three shapes (the world's four plus ellipses) with
  anti-aliased or hard edges; optional mild pixel noise.
- `near_scene`: a world scene moved just off the palette: a solid background of off-white, near-black
  or an off-grey, shapes drawn without anti-aliasing, object colours jittered by a few levels.

Pure numpy/PIL: no files, no paths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from pipeline.world import generator

IMAGE_SIZE = generator.IMAGE_SIZE
BROAD_BACKGROUNDS = ("solid", "gradient", "striped", "checkered", "cloudy")
BROAD_SHAPES = (*generator.SHAPES, "ellipse")
NOISE_SIGMA_MAX = 4.0  # pixel levels; kept mild so that a lossy 4x-downsampling VAE can still reach 32 dB
COLOR_JITTER = 12  # levels a near scene's object colours move off the palette


@dataclass(frozen=True)
class BroadBackground:
    """What a broad scene's background is drawn as.

    Attributes:
        kind: one of BROAD_BACKGROUNDS.
        period: width in pixels of a stripe or a check (4..16); None for the other kinds.
    """

    kind: str
    period: int | None = None


def broad_scene(seed: int, backgrounds: tuple[str, ...] = BROAD_BACKGROUNDS) -> np.ndarray:
    """One off-palette scene, uint8 (64, 64, 3), its background of one of `backgrounds` kinds.

    The kind is drawn uniformly from `backgrounds`: with the default a seed gives the same scene as it
    always has (the held-out sets); a subset draws among its kinds alone, and a kind named twice is
    drawn twice as often (training mixes weighted towards the hard kinds).
    """
    return broad_scene_with_background(seed, backgrounds)[0]


def broad_scene_with_background(
    seed: int, backgrounds: tuple[str, ...] = BROAD_BACKGROUNDS
) -> tuple[np.ndarray, BroadBackground]:
    """`broad_scene` and the background it was drawn with, from the same draws."""
    unknown = sorted(set(backgrounds) - set(BROAD_BACKGROUNDS))
    if unknown or not backgrounds:
        raise ValueError(
            f"backgrounds must name one or more kinds among {BROAD_BACKGROUNDS}, got {backgrounds}"
        )
    rng = np.random.default_rng([seed, 31])
    pixels, background = _background(rng, backgrounds)
    canvas = pixels.astype(np.float32)
    for _ in range(int(rng.integers(1, 4))):
        shape = str(rng.choice(BROAD_SHAPES))
        radius = float(rng.uniform(5.0, 22.0))
        center = (float(rng.uniform(0.0, IMAGE_SIZE)), float(rng.uniform(0.0, IMAGE_SIZE)))
        coverage = _shape_coverage(shape, center, radius, rng, antialiased=bool(rng.random() < 0.5))
        color = rng.uniform(0, 255, size=3).astype(np.float32)
        canvas = canvas * (1.0 - coverage[..., None]) + color * coverage[..., None]
    if rng.random() < 0.5:
        canvas = canvas + rng.normal(0.0, rng.uniform(0.0, NOISE_SIGMA_MAX), size=canvas.shape)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), background


def near_scene(seed: int) -> np.ndarray:
    """A world scene just off the palette (see the module docstring), uint8 (64, 64, 3)."""
    rng = np.random.default_rng([seed, 37])
    scene = generator.sample_scene(seed, two_object_fraction=0.2)
    level = float(rng.choice([rng.uniform(228, 250), rng.uniform(4, 24), rng.uniform(100, 156)]))
    canvas = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), level, np.float32)
    for obj in scene.objects:
        coverage = _shape_coverage(obj.shape, obj.center, obj.radius, rng, antialiased=False)
        color = np.asarray(generator.COLORS[obj.color], np.float32)
        color = color + rng.uniform(-COLOR_JITTER, COLOR_JITTER, size=3)
        canvas = canvas * (1.0 - coverage[..., None]) + color * coverage[..., None]
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def broad_images(seeds: range, backgrounds: tuple[str, ...] = BROAD_BACKGROUNDS) -> np.ndarray:
    """`broad_scene` of every seed, uint8 (N, 64, 64, 3)."""
    return np.stack([broad_scene(seed, backgrounds) for seed in seeds])


def near_images(seeds: range) -> np.ndarray:
    """`near_scene` of every seed, uint8 (N, 64, 64, 3)."""
    return np.stack([near_scene(seed) for seed in seeds])


def _background(rng: np.random.Generator, backgrounds: tuple[str, ...]) -> tuple[np.ndarray, BroadBackground]:
    kind = str(rng.choice(backgrounds))
    first, second = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
    ys, xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)
    period = None
    if kind == "solid":
        weight = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.float32)
    elif kind == "gradient":
        angle = rng.uniform(0.0, 2.0 * math.pi)
        projection = math.cos(angle) * xs + math.sin(angle) * ys
        weight = (projection - projection.min()) / (projection.max() - projection.min())
    elif kind == "striped":
        period = int(rng.integers(4, 17))
        weight = (((xs + ys) // period) % 2).astype(np.float32)
    elif kind == "checkered":
        period = int(rng.integers(4, 17))
        weight = (((xs // period) + (ys // period)) % 2).astype(np.float32)
    else:  # cloudy: bilinear upsampling of a seeded coarse grid
        cells = int(rng.integers(3, 9))
        grid = rng.uniform(0.0, 1.0, size=(cells, cells)).astype(np.float32)
        weight = np.asarray(Image.fromarray(grid, mode="F").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR))
    return first * (1.0 - weight[..., None]) + second * weight[..., None], BroadBackground(kind, period)


def _shape_coverage(
    shape: str, center: tuple[float, float], radius: float, rng: np.random.Generator, antialiased: bool
) -> np.ndarray:
    """Fraction of each pixel a shape covers, float32 (64, 64); hard edges are 0 or 1."""
    scale = generator.SUPERSAMPLE if antialiased else 1
    layer = Image.new("L", (IMAGE_SIZE * scale, IMAGE_SIZE * scale), 0)
    draw = ImageDraw.Draw(layer)
    cx, cy, r = center[0] * scale, center[1] * scale, radius * scale
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "ellipse":
        minor = r * float(rng.uniform(0.35, 0.9))
        draw.ellipse([cx - r, cy - minor, cx + r, cy + minor], fill=255)
    else:
        polygon = generator.shape_polygon(shape, center, radius)
        draw.polygon([(x * scale, y * scale) for x, y in polygon], fill=255)
    high = np.asarray(layer, np.float32) / 255.0
    return high.reshape(IMAGE_SIZE, scale, IMAGE_SIZE, scale).mean(axis=(1, 3))
