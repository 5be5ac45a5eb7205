"""Off-palette scenes: seeded, off the world's palette, with the edges and backgrounds they promise."""

import numpy as np
import pytest

from pipeline.world import broad, generator


def _palette() -> np.ndarray:
    greys = [(level, level, level) for level in generator.SOLID_BACKGROUNDS.values()]
    return np.array(list(generator.COLORS.values()) + greys)


def _on_palette_fraction(image: np.ndarray) -> float:
    pixels = image.reshape(-1, 1, 3).astype(int)
    return float((np.abs(pixels - _palette()[None]).max(axis=-1) == 0).any(axis=1).mean())


def test_scenes_are_seeded():
    for make in (broad.broad_scene, broad.near_scene):
        assert np.array_equal(make(3), make(3))
        assert not np.array_equal(make(3), make(4))
        assert make(3).shape == (64, 64, 3) and make(3).dtype == np.uint8


def test_broad_scenes_leave_the_palette_that_world_scenes_keep():
    world = [generator.render(generator.sample_scene(seed, 0.0)).image for seed in range(20)]
    world = [image for image, seed in zip(world, range(20), strict=True)
             if generator.sample_scene(seed, 0.0).background in generator.SOLID_BACKGROUNDS]  # fmt: skip
    assert min(_on_palette_fraction(image) for image in world) > 0.5
    assert np.mean([_on_palette_fraction(broad.broad_scene(seed)) for seed in range(40)]) < 0.05
    assert np.mean([_on_palette_fraction(broad.near_scene(seed)) for seed in range(40)]) < 0.05


def test_near_scenes_have_hard_edges_and_a_solid_off_palette_background():
    for seed in range(30):
        image = broad.near_scene(seed)
        objects = generator.sample_scene(seed, two_object_fraction=0.2).objects
        colours = np.unique(image.reshape(-1, 3), axis=0)
        # No anti-aliasing: only the background and each object's own colour, no blends between them.
        assert len(colours) <= 1 + len(objects)
        corner_levels = {tuple(image[y, x]) for y, x in [(0, 0), (0, 63), (63, 0), (63, 63)]}
        background = max(corner_levels, key=lambda level: (image == level).all(axis=-1).sum())
        assert len(set(background)) == 1  # grey
        assert background[0] not in generator.SOLID_BACKGROUNDS.values()


def test_broad_scenes_cover_hard_and_soft_edges_and_every_background_kind():
    colour_counts = [len(np.unique(broad.broad_scene(seed).reshape(-1, 3), axis=0)) for seed in range(60)]
    # Solid backgrounds with hard-edged shapes and no noise have a handful of colours; gradients,
    # clouds, noise and anti-aliased edges have hundreds.
    assert min(colour_counts) <= 4 and max(colour_counts) > 200
    kinds = {str(np.random.default_rng([seed, 31]).choice(broad.BROAD_BACKGROUNDS)) for seed in range(60)}
    assert kinds == set(broad.BROAD_BACKGROUNDS)


def test_a_scene_reports_the_background_it_was_drawn_with():
    """A stripe or check of width p repeats every 2p pixels along a row and flips after p: read off the
    pixels, not the drawing code, on scenes whose two background colours are far apart."""

    def same_after(pixels: np.ndarray, shift: int) -> float:
        return float((np.abs(pixels[:, : 64 - shift] - pixels[:, shift:]).max(axis=-1) < 20).mean())

    periodic = 0
    for seed in range(80):
        image, background = broad.broad_scene_with_background(seed)
        assert np.array_equal(image, broad.broad_scene(seed))
        assert background.kind in broad.BROAD_BACKGROUNDS
        assert (background.period is None) == (background.kind not in ("striped", "checkered"))
        if background.period is None or np.ptp(image.reshape(-1, 3).astype(int), axis=0).max() < 120:
            continue
        periodic += 1
        pixels, width = image.astype(int), background.period
        repeats = same_after(pixels, 2 * width)
        assert repeats > max(same_after(pixels, 2 * width - 2), same_after(pixels, 2 * width + 2)), seed
        assert same_after(pixels, width) < 0.3 < repeats, seed
    assert periodic >= 15


def test_training_mixes_can_draw_a_subset_of_background_kinds_with_weights():
    kinds = [
        broad.broad_scene_with_background(seed, ("solid", "striped", "striped"))[1].kind
        for seed in range(300)
    ]
    assert set(kinds) == {"solid", "striped"}
    assert 0.58 < kinds.count("striped") / 300 < 0.75  # drawn twice as often as solid: 2/3
    assert broad.broad_images(range(2), ("checkered",)).shape == (2, 64, 64, 3)
    with pytest.raises(ValueError, match="one or more kinds among"):
        broad.broad_scene(0, ("stripy",))
