"""The stochastic-edit benchmark (benchmarks/stochastic_world.py): its per-scene statistics against
hand-made samples, and a run end to end on a tiny random-weight model at the world's 64 px."""

from __future__ import annotations

import json
import math

import pytest
import torch
from editor_artefact import write_random_cond_vae

from benchmarks import stochastic_world
from pipeline.models.build import SDArchitecture, build_random_sd
from pipeline.models.loading import load_diffusion_model
from pipeline.world.oracle import load_oracle


def test_scene_scores_of_hand_made_samples():
    source = torch.full((8, 8, 3), 100, dtype=torch.uint8)
    region = torch.zeros(8, 8, dtype=torch.bool)
    region[2:4, 2:4] = True  # 4 pixels the edit may change
    first, second = source.clone(), source.clone()
    first[2:4, 2:4] = 200  # 4 object pixels of colour 200
    second[2, 2] = 250  # 1 object pixel; the other 3 stay at 100
    second[0, 0] = 110  # one background pixel off by 10 levels
    first[7, 7] = 120  # ...and one of the first's by 20
    samples = torch.stack([first, second])

    def distance(a, b):
        return (a - b).abs().flatten(1).mean(dim=1)

    masks = region[None].repeat(2, 1, 1)
    masks[1, 0, 0] = True  # the second edit's own mask covers its off pixel: outside it, unchanged
    scores = stochastic_world.scene_scores(samples, source, region, masks, load_oracle(), distance)
    unit = samples.permute(0, 3, 1, 2).float() / 255
    assert scores["diversity"] == pytest.approx(float(distance(unit[:1], unit[1:])))
    assert scores["bound"] == pytest.approx(
        float(distance(unit, (source.permute(2, 0, 1).float() / 255)[None]).mean())
    )
    # Background PSNR: 60 pixels outside the region, one of them off by 20 (first) or 10 (second) levels.
    expected = [10 * math.log10(1 / ((off / 255) ** 2 / 60)) for off in (20, 10)]
    assert scores["background_psnr"] == pytest.approx(sum(expected) / 2)
    assert math.isinf(scores["mask_background_psnr"])  # outside its own mask the second is unchanged
    masks[1, 0, 0] = False
    masks[1, 1, 1] = True  # now its off pixel is outside its mask, which holds 5 pixels
    rescored = stochastic_world.scene_scores(samples, source, region, masks, load_oracle(), distance)
    outside = [10 * math.log10(1 / ((off / 255) ** 2 / pixels)) for off, pixels in ((20, 60), (10, 59))]
    assert rescored["mask_background_psnr"] == pytest.approx(sum(outside) / 2)
    assert scores["region_area_std"] == pytest.approx(1.5)  # areas 4 and 1
    colour_means = torch.tensor([[200.0] * 3, [(250 + 300) / 4] * 3])
    assert scores["region_colour_std"] == pytest.approx(float(colour_means.std(dim=0, unbiased=False).mean()))


def test_the_benchmark_runs_end_to_end_with_a_vae_and_reruns_identically(tmp_path):
    build_random_sd(tmp_path / "sd", SDArchitecture(image_size=64), seed=0, unet_output_scale=0.05)
    model = load_diffusion_model(str(tmp_path / "sd"))
    write_random_cond_vae(model, str(tmp_path / "vae"), seed=1)
    output = tmp_path / "results" / "sweep"
    table = stochastic_world.main(
        [
            "--vae",
            str(tmp_path / "vae"),
            "--model",
            str(tmp_path / "sd"),
            "--scenes",
            "2",
            "--samples",
            "1",
            "3",
        ]
        + ["--temperatures", "2", "--steps", "3", "--output", str(output)]
    )
    reference, single, triple = table["rows"]
    assert reference["temperature"] is None and reference["reruns_identical"]
    assert single["diversity"] is None and triple["diversity"] > 0
    assert triple["samples"] == 3 and 0 <= triple["star_rate"] <= 1
    assert json.loads(output.with_suffix(".json").read_text())["rows"][2] == triple
    assert output.with_suffix(".png").stat().st_size > 0
