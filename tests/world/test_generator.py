"""Properties of the shapes-world renderer: determinism, caption grammar, ground-truth edits."""

import itertools

import numpy as np
import pytest

from pipeline.world import generator
from pipeline.world.generator import (
    BACKGROUNDS,
    COLORS,
    SHAPES,
    counterfactual,
    parse_caption,
    render,
    sample_scene,
    scene_from_attributes,
)

SEEDS = range(40)


def test_same_seed_same_scene_and_pixels():
    for seed in SEEDS:
        first, second = render(sample_scene(seed)), render(sample_scene(seed))
        assert first.scene == second.scene
        np.testing.assert_array_equal(first.image, second.image)
        np.testing.assert_array_equal(first.masks, second.masks)


def test_different_seeds_give_different_images():
    images = {render(sample_scene(seed)).image.tobytes() for seed in SEEDS}
    assert len(images) == len(SEEDS)


def test_image_and_mask_types():
    rendered = render(sample_scene(3, two_object_fraction=1.0))
    assert rendered.image.shape == (64, 64, 3) and rendered.image.dtype == np.uint8
    assert rendered.masks.shape == (2, 64, 64) and rendered.masks.dtype == bool
    assert all(mask.any() for mask in rendered.masks)


def test_one_object_caption_grammar_exact():
    for seed in SEEDS:
        scene = sample_scene(seed, two_object_fraction=0.0)
        obj = scene.objects[0]
        assert render(scene).caption == f"a {obj.color} {obj.shape} on a {scene.background} background"


def test_two_object_caption_parses_back_to_the_scene():
    for seed in SEEDS:
        scene = sample_scene(seed, two_object_fraction=1.0)
        parsed = parse_caption(render(scene).caption)
        assert parsed["background"] == scene.background
        assert parsed["objects"] == [{"color": o.color, "shape": o.shape} for o in scene.objects]


def test_one_object_fields_rebuild_the_caption_from_its_first_object():
    for seed in SEEDS:
        scene = sample_scene(seed, two_object_fraction=0.5)
        fields = generator.one_object_fields(render(scene).caption)
        first = scene.objects[0]
        assert fields == {"color": first.color, "shape": first.shape, "background": scene.background}
        one_object = generator.Scene(objects=(first,), background=scene.background, seed=scene.seed)
        assert generator.one_object_caption(**fields) == render(one_object).caption


@pytest.mark.parametrize(
    "bad", ["a red circle", "a pink circle on a white background", "red circle on a white background"]
)
def test_parse_caption_rejects_bad_captions(bad):
    with pytest.raises(ValueError):
        parse_caption(bad)


def test_every_vocabulary_combination_renders_its_colour():
    # The object's interior pixel (far from the edge) has exactly the object's colour.
    for shape, color, background in itertools.product(SHAPES, COLORS, BACKGROUNDS):
        scene = generator.Scene((generator.SceneObject(shape, color, (32.0, 32.0), 16.0),), background, 0)
        assert tuple(render(scene).image[32, 32]) == COLORS[color]


def _changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a != b).any(axis=-1)


@pytest.mark.parametrize("attribute", ["shape", "color"])
def test_object_edit_changes_only_the_edited_objects_pixels(attribute):
    rng = np.random.default_rng(0)
    values = {"shape": SHAPES, "color": tuple(COLORS)}[attribute]
    for seed in SEEDS:
        scene = sample_scene(seed, two_object_fraction=0.5)
        index = int(rng.integers(len(scene.objects)))
        current = getattr(scene.objects[index], attribute)
        new_value = next(v for v in values if v != current)
        source, edited = render(scene), counterfactual(scene, attribute, new_value, object_index=index)
        allowed = source.masks[index] | edited.masks[index]
        assert not (_changed(source.image, edited.image) & ~allowed).any()
        assert _changed(source.image, edited.image).any()
        # Everything else about the scene is kept.
        for other in range(len(scene.objects)):
            if other != index:
                assert edited.scene.objects[other] == scene.objects[other]
        assert getattr(edited.scene.objects[index], attribute) == new_value


def test_background_edit_changes_only_pixels_outside_objects():
    for seed in SEEDS:
        scene = sample_scene(seed, two_object_fraction=0.5)
        new_background = next(b for b in BACKGROUNDS if b != scene.background)
        source, edited = render(scene), counterfactual(scene, "background", new_value := new_background)
        fully_inside = np.zeros((64, 64), bool)
        for obj in scene.objects:
            fully_inside |= generator.object_coverage(obj) >= 1.0
        assert not (_changed(source.image, edited.image) & fully_inside).any()
        assert edited.attributes["background"] == new_value


def test_counterfactual_rejects_unknown_values():
    scene = sample_scene(0)
    with pytest.raises(ValueError, match="shape 'hexagon'"):
        counterfactual(scene, "shape", "hexagon")
    with pytest.raises(ValueError, match="unknown attribute"):
        counterfactual(scene, "size", "big")


def test_attributes_rebuild_the_exact_scene():
    import json

    for seed in SEEDS:
        rendered = render(sample_scene(seed, two_object_fraction=0.5))
        rebuilt = scene_from_attributes(json.loads(json.dumps(rendered.attributes)))
        np.testing.assert_array_equal(render(rebuilt).image, rendered.image)


def test_rare_shape_weights_and_exclusions():
    weights = {"star": 0.05, "circle": 1, "square": 1, "triangle": 1}
    shapes = [sample_scene(seed, 0.0, shape_weights=weights).objects[0].shape for seed in range(2000)]
    assert 0.005 < shapes.count("star") / len(shapes) < 0.04
    excluded = frozenset({render(sample_scene(seed, 0.0)).caption for seed in range(5)})
    for seed in range(200):
        assert render(sample_scene(seed, 0.0, exclude_captions=excluded)).caption not in excluded
