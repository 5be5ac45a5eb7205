"""The clip stage: its contrastive loss, its counterfactual hard negatives, and a short run."""

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from pipeline.config import ConfigError
from pipeline.training import world_clip
from pipeline.training.world_config import DEFAULT_CONFIG, load_train_config
from pipeline.world import generator
from pipeline.world.clip_model import SHAPES_CLIP_CONFIG

ROOT = Path(__file__).resolve().parents[2]


def _config(tmp_path, section="clip", **clip):
    settings = {"steps": 2, "batch": 8, "lr": 1e-3, "max_minutes": 5} | clip
    overrides = [f"output={tmp_path / 'out'}", f"cache_dir={tmp_path / 'cache'}", "data.train_scenes=24",
                 "data.heldout_scenes=4"] + [f"{section}.{key}={value}" for key, value in settings.items()]  # fmt: skip
    return load_train_config(DEFAULT_CONFIG, overrides)


def _captions_of_each_step(monkeypatch, stage, config) -> list[list[str]]:
    """Run a clip stage, recording the captions of every batch its loss sees."""
    seen = []
    original = world_clip.contrastive_loss
    monkeypatch.setattr(
        world_clip,
        "contrastive_loss",
        lambda logits, captions: seen.append(list(captions)) or original(logits, captions),
    )
    stage(config)
    return seen


def test_loss_with_distinct_captions_is_open_clips_clip_loss():
    torch.manual_seed(0)
    image_features = torch.nn.functional.normalize(torch.randn(6, 16), dim=-1)
    text_features = torch.nn.functional.normalize(torch.randn(6, 16), dim=-1)
    logit_scale = torch.tensor(7.0)
    expected = open_clip.loss.ClipLoss()(image_features, text_features, logit_scale)
    captions = [f"caption {i}" for i in range(6)]
    got = world_clip.contrastive_loss(logit_scale * image_features @ text_features.T, captions)
    assert torch.allclose(got, expected, atol=1e-6)


def test_loss_shares_the_target_among_texts_of_the_same_caption():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.5, 3.0, 1.0], [0.0, 1.0, 2.0]])
    captions = ["a", "b", "a"]
    rows = torch.log_softmax(logits, dim=1)
    columns = torch.log_softmax(logits.T, dim=1)
    # image 0 and 2 both match texts 0 and 2, half each; image 1 only text 1 (and the same for texts)
    by_hand = -(
        (rows[0, 0] + rows[0, 2]) / 2 + rows[1, 1] + (rows[2, 0] + rows[2, 2]) / 2
        + (columns[0, 0] + columns[0, 2]) / 2 + columns[1, 1] + (columns[2, 0] + columns[2, 2]) / 2
    ) / 6  # fmt: skip
    assert torch.allclose(world_clip.contrastive_loss(logits, captions), by_hand, atol=1e-6)


def test_counterfactuals_change_one_attribute_of_their_scene():
    seeds = list(range(40))
    images, captions = world_clip.counterfactual_scenes(seeds, 0.15, frozenset(), np.random.default_rng(0))
    assert images.shape == (40, 64, 64, 3) and images.dtype == np.uint8
    changed = []
    for seed, image, caption in zip(seeds, images, captions, strict=True):
        scene = generator.sample_scene(seed, 0.15)
        source, edited = (
            generator.parse_caption(generator.caption_for(scene)),
            generator.parse_caption(caption),
        )
        differing = [
            (attribute, index)
            for index, (old, new) in enumerate(zip(source["objects"], edited["objects"], strict=True))
            for attribute in ("shape", "color")
            if old[attribute] != new[attribute]
        ] + [("background", 0)] * (source["background"] != edited["background"])
        assert len(differing) == 1 and differing[0][1] == 0, (seed, caption)
        attribute = differing[0][0]
        value = edited["background"] if attribute == "background" else edited["objects"][0][attribute]
        assert np.array_equal(image, generator.counterfactual(scene, attribute, value).image)
        changed.append(attribute)
    assert set(changed) == {"shape", "color", "background"}


def test_counterfactuals_never_render_an_excluded_caption():
    seeds = list(range(30))
    rng = np.random.default_rng(1)
    first = world_clip.counterfactual_scenes(seeds, 0.0, frozenset(), rng)[1]
    excluded = frozenset(first)  # every change drawn the first time is now held out
    again = world_clip.counterfactual_scenes(seeds, 0.0, excluded, np.random.default_rng(1))[1]
    assert not set(again) & excluded


def test_counterfactual_fraction_outside_zero_one_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="counterfactual_fraction"):
        _config(tmp_path, counterfactual_fraction=1.5)


def test_the_guide_stage_trains_on_twice_the_scenes_and_writes_its_own_file(tmp_path, monkeypatch):
    config = _config(
        tmp_path, section="clip_guide", counterfactual_fraction=1.0, resized_fraction=0.0, steps=1
    )
    seen = _captions_of_each_step(monkeypatch, world_clip.train_clip_guide, config)
    assert len(seen) == 1 and len(seen[0]) == 16
    sources, edited = seen[0][:8], seen[0][8:]
    assert all(source != change for source, change in zip(sources, edited, strict=True))
    metrics = json.loads((tmp_path / "out" / "train_metrics.json").read_text())
    assert set(metrics) == {"clip_guide"}
    assert metrics["clip_guide"]["steps"] == 1 and metrics["clip_guide"]["counterfactual_fraction"] == 1.0
    assert 0.0 <= metrics["clip_guide"]["heldout_caption_top1_of_144"] <= 1.0
    assert [path.name for path in (tmp_path / "out").glob("*.safetensors")] == [
        "shapes_clip_guide.safetensors"
    ]


def test_the_metric_clip_stage_has_no_hard_negatives_by_default(tmp_path, monkeypatch):
    config = _config(tmp_path, steps=1)
    assert config.clip.counterfactual_fraction == 0.0
    seen = _captions_of_each_step(monkeypatch, world_clip.train_clip, config)
    assert [len(captions) for captions in seen] == [8]
    assert (tmp_path / "out" / "shapes_clip.safetensors").is_file()


def test_resized_scenes_keep_the_caption_and_move_only_the_first_object_within_bounds():
    rng = np.random.default_rng(0)
    radii, shifts = [], []
    for seed in range(60):
        scene = generator.sample_scene(seed, 0.3)
        resized = world_clip.resized_scene(scene, rng)
        assert generator.caption_for(resized) == generator.caption_for(scene)
        assert resized.objects[1:] == scene.objects[1:] and resized.background == scene.background
        old, new = scene.objects[0], resized.objects[0]
        radii.append(new.radius / old.radius)
        shifts += [new.center[0] - old.center[0], new.center[1] - old.center[1]]
        assert all(new.radius + 1.0 <= c <= generator.IMAGE_SIZE - new.radius - 1.0 for c in new.center)
    assert min(radii) >= 0.6 and max(radii) <= 1.0 and max(radii) - min(radii) > 0.3
    assert max(map(abs, shifts)) <= 8.0 and np.std(shifts) > 2.0
    rendered = world_clip.resized_scenes([3, 4], 0.3, frozenset(), np.random.default_rng(5))
    again = np.random.default_rng(5)
    expected = [
        generator.render(world_clip.resized_scene(generator.sample_scene(s, 0.3), again)).image
        for s in (3, 4)
    ]
    assert np.array_equal(rendered, np.stack(expected))


def test_the_guide_stage_enters_resized_positives_under_their_own_captions(tmp_path, monkeypatch):
    config = _config(
        tmp_path, section="clip_guide", counterfactual_fraction=0.5, resized_fraction=0.25, steps=1
    )
    (captions,) = _captions_of_each_step(monkeypatch, world_clip.train_clip_guide, config)
    assert len(captions) == 8 + 4 + 2
    assert captions[12:] == captions[6:8]  # the last two scenes again, resized, same captions


def test_wobbly_images_bend_and_mottle_only_the_first_object_and_keep_its_colour_on_average():
    rng = np.random.default_rng(0)
    moved = []
    for seed in range(40):
        scene = generator.sample_scene(seed, 0.3)
        rendered = generator.render(scene)
        wobbly = world_clip.wobbly_image(scene, rng).astype(np.float64)
        first = scene.objects[0]
        # Bent by at most 2 x 0.15 of the radius (the two harmonics), so pixels farther away are untouched.
        ys, xs = np.mgrid[: generator.IMAGE_SIZE, : generator.IMAGE_SIZE] + 0.5
        far = np.hypot(xs - first.center[0], ys - first.center[1]) > first.radius * 1.3 + 2.0
        assert np.array_equal(wobbly[far], rendered.image[far].astype(np.float64))  # other objects too
        inside = _object_core(rendered.masks[0], wobbly)
        colour = np.asarray(generator.COLORS[first.color], np.float64)
        assert np.all(np.abs(inside.mean(0) - colour) <= 0.3 * colour + 2.0)  # the mottle averages out
        moved.append(float(np.abs(wobbly - rendered.image).mean()))
    assert min(moved) > 0.0  # every first object bent or mottled
    images = world_clip.wobbly_scenes([3, 4], 0.3, frozenset(), np.random.default_rng(5))
    again = np.random.default_rng(5)
    expected = [world_clip.wobbly_image(generator.sample_scene(s, 0.3), again) for s in (3, 4)]
    assert np.array_equal(images, np.stack(expected))


def _object_core(mask: np.ndarray, image: np.ndarray) -> np.ndarray:
    """Pixels (N, 3) of `image` well inside the object's mask (away from its bent edge)."""
    from scipy.ndimage import binary_erosion

    core = binary_erosion(mask, iterations=max(2, int(mask.sum() ** 0.5 * 0.3)))
    return image[core]


def test_the_guide_stage_enters_wobbly_positives_under_their_own_captions(tmp_path, monkeypatch):
    config = _config(
        tmp_path,
        section="clip_guide",
        counterfactual_fraction=0.0,
        resized_fraction=0.0,
        wobbly_fraction=0.25,
        steps=1,
    )
    (captions,) = _captions_of_each_step(monkeypatch, world_clip.train_clip_guide, config)
    assert len(captions) == 8 + 2
    assert captions[8:] == captions[:2]  # the first two scenes again, bent and mottled, same captions
    with pytest.raises(ConfigError, match="wobbly_fraction"):
        _config(tmp_path, wobbly_fraction=-0.1)


def test_a_stage_trains_the_architecture_its_config_names_and_editors_load_it(tmp_path):
    from safetensors.torch import load_file

    from pipeline.training.diffusion_clip import ClipSpec, load_clip

    shipped = json.loads(SHAPES_CLIP_CONFIG.read_text())
    finer = {**shipped, "vision_cfg": {**shipped["vision_cfg"], "patch_size": 4}}
    architecture = tmp_path / "shapes-clip-test-p4.json"
    architecture.write_text(json.dumps(finer))
    config = _config(tmp_path, section="clip_guide", steps=1, architecture=str(architecture))
    world_clip.train_clip_guide(config)
    metrics = json.loads((tmp_path / "out" / "train_metrics.json").read_text())
    assert metrics["clip_guide"]["architecture"] == "shapes-clip-test-p4"
    weights = tmp_path / "out" / "shapes_clip_guide.safetensors"
    # A 4-pixel patch embedding: (width, 3, 4, 4), not the shipped (width, 3, 8, 8).
    assert load_file(weights)["visual.conv1.weight"].shape == (shipped["vision_cfg"]["width"], 3, 4, 4)
    clip = load_clip(ClipSpec("shapes-clip-test-p4", str(weights), str(architecture)), torch.device("cpu"))
    embeddings = clip.image_embeddings(torch.rand(2, 3, 64, 64))
    assert embeddings.shape == (2, shipped["embed_dim"]) and torch.isfinite(embeddings).all()


def test_an_architecture_file_that_is_missing_is_named(tmp_path):
    config = _config(tmp_path, section="clip_guide", steps=1, architecture=str(tmp_path / "nowhere.json"))
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        world_clip.train_clip_guide(config)


def test_the_finer_patch_architecture_in_jobs_is_the_shipped_one_with_4_pixel_patches():
    from pipeline.metrics.clip import register_model_config

    path = ROOT / "jobs" / "architectures" / "shapes-clip-vit-tiny-p4.json"
    finer, shipped = json.loads(path.read_text()), json.loads(SHAPES_CLIP_CONFIG.read_text())
    assert register_model_config(path) == "shapes-clip-vit-tiny-p4"
    assert finer["vision_cfg"].pop("patch_size") == 4 and shipped["vision_cfg"].pop("patch_size") == 8
    assert finer == shipped


def test_a_stage_writes_a_named_second_clip_in_float16_and_scores_the_rounded_weights(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    scored = []
    original = world_clip.clip_caption_accuracy

    def recording(model, *arguments):
        scored.append({name: value.clone() for name, value in model.state_dict().items()})
        return original(model, *arguments)

    monkeypatch.setattr(world_clip, "clip_caption_accuracy", recording)
    config = _config(
        tmp_path, section="clip_guide", steps=1, output_name="shapes_clip_guide_half", save_dtype="float16"
    )
    world_clip.train_clip_guide(config)
    out = tmp_path / "out"
    assert not (out / "shapes_clip_guide.safetensors").exists()  # the shipped guide's file is left alone
    stored = load_file(out / "shapes_clip_guide_half.safetensors")
    assert {value.dtype for value in stored.values()} == {torch.float16}
    # the accuracy was measured on exactly the stored weights, loaded back as float32
    ((name, value),) = [(name, value) for name, value in scored[0].items() if name == "visual.conv1.weight"]
    assert value.dtype == torch.float32 and torch.equal(value, stored[name].float())
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert (
        set(metrics) == {"shapes_clip_guide_half"}
        and metrics["shapes_clip_guide_half"]["save_dtype"] == "float16"
    )
    with pytest.raises(ConfigError, match="save_dtype"):
        _config(tmp_path, save_dtype="int8")
