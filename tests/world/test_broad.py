"""Off-palette scenes: seeded, off the world's palette, with the edges and backgrounds they promise."""

import numpy as np

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
