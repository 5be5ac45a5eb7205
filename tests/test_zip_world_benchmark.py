"""The ZIP benchmark (benchmarks/zip_world.py) end to end on a tiny random-weight model at the world's
64 px with a random encoder: its fingerprint check, the Δh-scale curve's end points against the
encoder applied by hand, and the strip it writes."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from editor_artefact import write_random_zip_encoder

from benchmarks import zip_world
from benchmarks.diffusion_clip_world import judged
from pipeline.editors import EditSettings, edit_with_zip, forward_to_return_step, load_editor
from pipeline.metrics.diversity import attribute_spread
from pipeline.models.build import SDArchitecture, build_random_sd
from pipeline.models.loading import load_diffusion_model
from pipeline.world import generator
from pipeline.world.oracle import HEADS, load_oracle


def test_the_benchmark_reports_a_frozen_model_and_the_encoders_own_edits(tmp_path, monkeypatch):
    build_random_sd(tmp_path / "sd", SDArchitecture(image_size=64), seed=0, unet_output_scale=0.05)
    model = load_diffusion_model(str(tmp_path / "sd"))
    uri = str(tmp_path / "zip")
    write_random_zip_encoder(model, uri, seed=4)
    monkeypatch.setattr(zip_world, "RESULTS", tmp_path / "results")
    args = [uri, "--model", str(tmp_path / "sd"), "--scenes", "2", "--forward-steps", "2"]
    results = zip_world.main(
        [*args, "--generative-steps", "2", "--text-steps", "2", "--scales", "0", "1", "--write", "zip_run"]
    )
    assert results["frozen"]["unchanged"] and results["frozen"]["before"] == model.fingerprint[:16]
    report = results["shape->star"]
    assert len(report["transition_target_probability"]) == 2 and 0.0 <= report["success"] <= 1.0
    consistency = results["consistency"]
    assert set(consistency) == {"zip_user_reference", "zip_own_reference", "text_only_direct_p2p"}
    # The edit the benchmark scores is the encoder's edit applied by hand: its pixel distance from the
    # source is recomputed here.
    scenes = zip_world.heldout_scenes(2, [("shape", "star")])
    images = torch.as_tensor(np.stack([zip_world.generator.render(scene).image for scene in scenes]))
    encoder = load_editor(model, uri)
    settings = EditSettings.of(encoder, forward_steps=2, generative_steps=2)
    edited = edit_with_zip(model, images, encoder, settings=settings)
    second = edit_with_zip(model, images, encoder, reference=encoder.reference_images[1], settings=settings)
    distances = {
        "edit_vs_source_pixels": float((edited.float() - images.float()).abs().mean()),
        "edit_first_vs_second_reference_pixels": float((edited.float() - second.float()).abs().mean()),
    }
    for name, distance in distances.items():
        assert abs(results["references"][name] - distance) <= 0.005 + 1e-9, name  # rounded to 2 places
    assert distances["edit_first_vs_second_reference_pixels"] > 0.1
    # The ground-truth readings are of the same edit against the scenes rendered with a star.
    truths = torch.as_tensor(
        np.stack([zip_world.generator.counterfactual(s, "shape", "star").image for s in scenes])
    )
    checks = judged(edited, images, truths, "shape", scenes)
    assert report["gt_psnr_db"] == round(float(np.mean(checks["gt_psnr_db"])), 2)
    assert report["closer_than_source"] == float(np.mean(checks["closer"]))
    hits = np.array([name == "star" for name in zip_world.oracle_readings(load_oracle(), edited)[0]["shape"]])
    assert report["faithful_sized_success"] == float(np.mean(hits & checks["closer"] & checks["size_kept"]))
    assert not [key for key in report if key.startswith("target_probability")]  # the consistency section's
    # the own-reference reading is the edit at Δh scale 1: the transition's last point, read apart
    assert (
        consistency["zip_own_reference"]["target_probability_mean"]
        == report["transition_target_probability"][-1]
    )
    assert consistency["zip_own_reference"]["gt_psnr_db"] == report["gt_psnr_db"]
    assert consistency["text_only_direct_p2p"]["gt_psnr_db"] != report["gt_psnr_db"]
    assert set(results["style"]) == {
        "per_user_reference_color",
        "mean_over_colors",
        "color_spread_difference",
        "own_references_followed",
    }
    assert json.loads((tmp_path / "results" / "zip_run.json").read_text())["frozen"]["unchanged"]
    assert (tmp_path / "results" / "zip_run.png").stat().st_size > 0


class ProjectionOracle:
    """A stand-in oracle whose logits are a fixed random projection of the whole image: every pixel moves
    every probability, so readings tell apart edits that the real oracle reads alike on a random model."""

    def __init__(self, size: int = 64) -> None:
        generator_ = torch.Generator().manual_seed(0)
        self.weights = {
            head: torch.randn(3 * size * size, len(names), generator=generator_) / 30.0
            for head, names in HEADS.items()
        }

    def __call__(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        flat = pixels.flatten(1).float()
        return {head: flat @ weights for head, weights in self.weights.items()}


def test_the_style_reading_is_of_edits_with_each_colours_reference(tmp_path):
    import argparse

    build_random_sd(tmp_path / "sd", SDArchitecture(image_size=64), seed=0, unet_output_scale=0.05)
    model = load_diffusion_model(str(tmp_path / "sd"))
    write_random_zip_encoder(model, str(tmp_path / "zip"), seed=4)
    encoder = load_editor(model, str(tmp_path / "zip"))
    # A third reference: the first with a corner brightened, read in the same colour (checked below) but
    # editing differently, so that "the first reference of each colour" is told from the last.
    third = encoder.reference_images[0].clone()
    third[:32, :32] += 40
    encoder = dataclasses.replace(
        encoder, reference_images=torch.cat([encoder.reference_images, third[None]])
    )
    settings = EditSettings.of(encoder, forward_steps=2, generative_steps=2)
    scenes = zip_world.heldout_scenes(3, [("shape", "star")])
    images = torch.as_tensor(np.stack([generator.render(scene).image for scene in scenes]))
    oracle = ProjectionOracle()
    with torch.no_grad():
        start = forward_to_return_step(model, images, settings)
    args = argparse.Namespace(text_steps=2)
    plain = zip_world.text_only_edits(model, scenes, "shape", "star", args.text_steps)  # as `evaluate` has it
    style = zip_world.style_readings(model, oracle, encoder, scenes, images, start, plain, settings, args)
    assert set(style["per_user_reference_color"]) == set(generator.COLORS)
    # By hand: a star of each colour drawn by the renderer as the reference, read against the scenes
    # rendered with a star of that colour.
    zip_spreads = []
    for color in generator.COLORS:
        star = generator.SceneObject(shape="star", color=color, center=(32.0, 32.0), radius=20.0)
        reference = generator.render(generator.Scene(objects=(star,), background="white", seed=0)).image
        by_hand = edit_with_zip(
            model, images, encoder, reference=torch.as_tensor(reference), settings=settings
        )
        names, probabilities = zip_world.oracle_readings(oracle, by_hand)
        in_color = np.array([name == color for name in names["color"]])
        stars = np.array([name == "star" for name in names["shape"]])
        truths = torch.as_tensor(
            np.stack(
                [
                    generator.counterfactual(generator.edit_scene(s, "color", color), "shape", "star").image
                    for s in scenes
                ]
            )
        )
        checks = judged(by_hand, images, truths, "shape", scenes)
        reading = style["per_user_reference_color"][color]["zip_user_reference"]
        probability = probabilities["color"][:, HEADS["color"].index(color)]
        assert reading["color_probability_mean"] == round(float(probability.mean()), 4), color
        assert reading["color_probability_std"] == round(float(probability.std()), 4), color
        assert reading["followed"] == float(in_color.mean()), color
        assert reading["color_spread"] == round(attribute_spread(probabilities["color"]), 4), color
        zip_spreads.append(attribute_spread(probabilities["color"]))
        assert reading["success"] == float(np.mean(in_color & stars)), color
        assert reading["gt_psnr_db"] == round(float(np.mean(checks["gt_psnr_db"])), 2), color
        faithful = in_color & stars & checks["closer"] & checks["size_kept"]
        assert reading["faithful_sized_success"] == float(np.mean(faithful)), color
    blue = style["per_user_reference_color"]["blue"]["zip_user_reference"]
    red = style["per_user_reference_color"]["red"]["zip_user_reference"]
    assert red["color_probability_mean"] != blue["color_probability_mean"]
    # The word swaps: to the plain target (the same edits for every colour) and with the colour named,
    # rebuilt from the captions by hand ("a green star ..." in place of each source's colour and shape).
    from pipeline.engine import AttentionControl, EditRequest, InversionConfig, edit, invert

    captions = [generator.render(scene).caption for scene in scenes]
    inversion = invert(model, images, captions, InversionConfig.of("direct", num_steps=2, guidance_scale=7.5))
    control = AttentionControl("replace", cross_replace_steps=0.8, self_replace_steps=0.4)
    swapped = {}
    for key, color in (("text_only_direct_p2p", None), ("text_only_color_named", "green")):
        targets = [
            " ".join(["a", color or caption.split()[1], "star", *caption.split()[3:]]) for caption in captions
        ]
        results = edit(
            model, inversion, [EditRequest(i, target, control) for i, target in enumerate(targets)]
        )
        swapped[key] = torch.stack([torch.as_tensor(result.image) for result in results])
    green = style["per_user_reference_color"]["green"]
    for key, edits in swapped.items():
        green_probability = zip_world.oracle_readings(oracle, edits)[1]["color"][
            :, HEADS["color"].index("green")
        ]
        assert green[key]["color_probability_mean"] == round(float(green_probability.mean()), 4), key
        colors_read = zip_world.oracle_readings(oracle, edits)[1]["color"]
        assert green[key]["color_spread"] == round(attribute_spread(colors_read), 4), key
    # ZIP's spread against the plain swap's (the same edits for every colour), averaged over the colours
    plain_spread = attribute_spread(
        zip_world.oracle_readings(oracle, swapped["text_only_direct_p2p"])[1]["color"]
    )
    against_plain = style["color_spread_difference"]["zip_minus_plain_swap"]
    assert against_plain["difference"] == round(float(np.mean(zip_spreads)) - plain_spread, 4)
    for interval in style["color_spread_difference"].values():
        assert interval["low"] <= interval["difference"] <= interval["high"]
    assert green["text_only_color_named"] != green["text_only_direct_p2p"]
    for method in ("zip_user_reference", "text_only_direct_p2p", "text_only_color_named"):
        each = [style["per_user_reference_color"][color][method]["followed"] for color in generator.COLORS]
        assert style["mean_over_colors"][method]["followed"] == round(float(np.mean(each)), 4)
        spreads = [
            style["per_user_reference_color"][color][method]["color_spread"] for color in generator.COLORS
        ]
        assert style["mean_over_colors"][method]["color_spread"] == pytest.approx(np.mean(spreads), abs=1e-4)
    # The encoder's own references (black, white): one entry per colour the oracle reads, the first such.
    reference_colors = zip_world.oracle_readings(oracle, encoder.reference_images)[0]["color"]
    assert reference_colors[2] == reference_colors[0]
    assert set(style["own_references_followed"]) == set(reference_colors)
    for index in sorted({reference_colors.index(color) for color in reference_colors}):
        color = reference_colors[index]
        edited = edit_with_zip(
            model, images, encoder, reference=encoder.reference_images[index], settings=settings
        )
        own_probability = zip_world.oracle_readings(oracle, edited)[1]["color"][
            :, HEADS["color"].index(color)
        ]
        assert style["own_references_followed"][color]["color_probability_mean"] == round(
            float(own_probability.mean()), 4
        )


def test_the_spread_difference_is_paired_over_scenes_and_its_interval_holds_the_resampled_differences():
    values = torch.eye(6)
    # First: every edit read red (no spread). Second: the edits alternate green and blue (Gini 0.5).
    first = values[[0] * 16].expand(3, 16, 6)
    second = values[[1, 2] * 8].expand(3, 16, 6)
    interval = zip_world.spread_difference_interval(first, second, draws=200)
    assert interval["difference"] == -0.5
    # No resample of scenes gives the first the larger spread; one of the same scene throughout would
    # give 0, so the interval ends at or below 0.
    assert interval["low"] <= -0.3 and interval["high"] < 0
    swapped = zip_world.spread_difference_interval(second, first, draws=200)
    assert (swapped["difference"], swapped["low"], swapped["high"]) == (
        0.5,
        -interval["high"],
        -interval["low"],
    )
    # Paired: scenes are drawn together for both methods, so a method against itself differs by 0.
    mixed = torch.randn(2, 10, 6, generator=torch.Generator().manual_seed(1)).softmax(-1)
    assert zip_world.spread_difference_interval(mixed, mixed, draws=50) == {
        "difference": 0.0,
        "low": 0.0,
        "high": 0.0,
    }
