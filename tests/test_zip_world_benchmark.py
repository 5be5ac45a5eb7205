"""The ZIP benchmark (benchmarks/zip_world.py) end to end on a tiny random-weight model at the world's
64 px with a random encoder: its fingerprint check, the Δh-scale curve's end points against the
encoder applied by hand, and the strip it writes."""

from __future__ import annotations

import json

import numpy as np
import torch
from editor_artefact import write_random_zip_encoder

from benchmarks import zip_world
from benchmarks.diffusion_clip_world import judged
from pipeline.editors import EditSettings, edit_with_zip, load_editor
from pipeline.models.build import SDArchitecture, build_random_sd
from pipeline.models.loading import load_diffusion_model
from pipeline.world.oracle import load_oracle


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
    assert json.loads((tmp_path / "results" / "zip_run.json").read_text())["frozen"]["unchanged"]
    assert (tmp_path / "results" / "zip_run.png").stat().st_size > 0
