"""The oracle-size benchmark (benchmarks/oracle_sizes.py) with the shipped oracle and VAE: every shape,
colour and background counted, rendered and decoded; the failure the size reading exists for below the
world's sizes; and the size reading keeping the VAE's reconstructions of true stars."""

from __future__ import annotations

import numpy as np
import torch

from benchmarks import diffusion_clip_world as bench
from benchmarks import oracle_sizes
from pipeline.models.loading import load_diffusion_model
from pipeline.training.world_vae import vae_reconstructions
from pipeline.world import generator


def test_small_convex_shapes_read_as_stars_and_world_sizes_read_right_rendered_and_decoded():
    results = oracle_sizes.main(["--radii", "5", "14", "--calibration-scenes", "16"])
    combinations = len(generator.BACKGROUNDS) * len(generator.COLORS)
    for radius in ("5", "14"):
        assert results["radii"][radius]["convex"]["scenes"] == 3 * combinations
        assert results["radii"][radius]["star"]["scenes"] == combinations
    for kind in ("convex", "star"):
        world_size = results["radii"]["14"][kind]
        assert world_size["right_rendered"] == world_size["right_decoded"] == world_size["scenes"]
    small = results["radii"]["5"]["convex"]
    for name in ("rendered", "decoded"):
        assert small[f"read_as_star_{name}"] > small["scenes"] / 2 > small[f"right_{name}"]
    calibration = results["size_calibration"]
    assert calibration["kept"] == 1.0 and calibration["area_ratio_min"] >= bench.SIZE_KEPT


def test_the_calibration_ratio_is_the_decoded_truths_area_over_the_truths():
    vae = load_diffusion_model("pipeline/world/assets/shapes-sd").vae
    scenes = bench.heldout_scenes(3, [("shape", "star")])
    truths = [generator.counterfactual(scene, "shape", "star").image for scene in scenes]
    decoded = vae_reconstructions(vae, np.stack(truths))
    by_hand = [
        bench.object_areas(torch.as_tensor(d[None]), [s]).item()
        / bench.object_areas(torch.as_tensor(t[None]), [s]).item()
        for d, t, s in zip(decoded, truths, scenes, strict=True)
    ]
    calibration = oracle_sizes.size_calibration(vae, 3)
    assert calibration["area_ratio_min"] == round(min(by_hand), 3)
    assert calibration["area_ratio_max"] == round(max(by_hand), 3)
