"""The vae-broad stage: its batches, its held-out report, and the anchor that keeps the UNet's latents."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from pipeline.config import ConfigError
from pipeline.models.build import SDArchitecture, build_vae
from pipeline.training import world_data, world_vae, world_vae_broad
from pipeline.training.world_config import DEFAULT_CONFIG, load_train_config
from pipeline.training.world_data import training_scenes
from pipeline.training.world_vae import shipped_vae_folder, vae_reconstructions
from pipeline.world import broad


def _config(tmp_path, **vae_broad):
    settings = {"steps": 6, "batch": 6, "world_fraction": 0.5, "near_fraction": 1 / 6, "lr": 1e-3,
                "heldout_scenes": 4, "anchor_weight": 10.0} | vae_broad  # fmt: skip
    overrides = [f"output={tmp_path / 'out'}", f"cache_dir={tmp_path / 'cache'}", "data.train_scenes=24",
                 "data.heldout_scenes=4"] + [f"vae_broad.{key}={value}" for key, value in settings.items()]  # fmt: skip
    return load_train_config(DEFAULT_CONFIG, overrides)


def _ship_tiny_vae(config) -> AutoencoderKL:
    torch.manual_seed(0)
    vae = build_vae(SDArchitecture(image_size=64, vae_channels=(8, 16, 16))).eval()
    vae.save_pretrained(shipped_vae_folder(config), safe_serialization=True)
    return vae


def test_a_batch_mixes_world_near_and_broad_scenes_from_training_seeds(tmp_path):
    config = _config(tmp_path)
    world = training_scenes(config).images
    batch = world_vae_broad.broad_batch(np.random.default_rng(0), world, config, step=2)
    assert batch.shape == (6, 64, 64, 3)
    assert all(any(np.array_equal(image, scene) for scene in world) for image in batch[:3])
    # Step 2 of batch 6 draws seeds 12.. for its three off-palette scenes: one near, two broad.
    assert np.array_equal(batch[3], broad.near_scene(12))
    assert np.array_equal(batch[4:], broad.broad_images(range(13, 15)))


def test_a_batch_draws_its_broad_scenes_from_the_configured_background_kinds(tmp_path):
    config = _config(tmp_path, backgrounds="[checkered]")
    world = training_scenes(config).images
    batch = world_vae_broad.broad_batch(np.random.default_rng(0), world, config, step=2)
    assert np.array_equal(batch[4:], broad.broad_images(range(13, 15), ("checkered",)))
    assert not np.array_equal(batch[4:], broad.broad_images(range(13, 15)))


def test_an_unknown_background_kind_is_a_config_error_naming_the_key_and_the_kinds(tmp_path):
    with pytest.raises(ConfigError, match=r"vae_broad.backgrounds must name kinds among \['solid'"):
        _config(tmp_path, backgrounds="[stripy]")


def test_training_seeds_never_reach_the_held_out_seeds(tmp_path):
    config = _config(tmp_path)
    last_step = world_data.BROAD_HELDOUT_SEED_OFFSET // config.vae_broad.batch
    with pytest.raises(ValueError, match="vae_broad.steps"):
        world_vae_broad.broad_batch(
            np.random.default_rng(0), np.zeros((1, 64, 64, 3), np.uint8), config, last_step
        )


def test_report_is_mean_and_worst_psnr_per_family(tmp_path):
    torch.manual_seed(0)
    vae = build_vae(SDArchitecture(image_size=64, vae_channels=(8, 16, 16))).eval()
    families = {"broad": broad.broad_images(range(3))}
    report = world_vae.reconstruction_report(vae, families)
    decoded = vae_reconstructions(vae, families["broad"]).astype(float)
    psnr = [
        10 * np.log10(255**2 / ((d - s) ** 2).mean()) for d, s in zip(decoded, families["broad"], strict=True)
    ]
    assert report == {"broad_psnr_mean_db": round(float(np.mean(psnr)), 2),
                      "broad_psnr_min_db": round(float(np.min(psnr)), 2)}  # fmt: skip


def _shift_after_training(tmp_path, anchor_weight: float) -> float:
    config = _config(tmp_path, anchor_weight=anchor_weight)
    _ship_tiny_vae(config)
    world_vae_broad.train_vae_broad(config)
    return json.loads((tmp_path / "out" / "train_metrics.json").read_text())["vae_broad"]


def test_the_anchor_keeps_the_world_latents_and_the_stage_ships_what_it_records(tmp_path):
    free = _shift_after_training(tmp_path / "free", anchor_weight=0.0)
    anchored = _shift_after_training(tmp_path / "anchored", anchor_weight=1000.0)
    assert anchored["world_latent_shift_rms"] < 0.5 * free["world_latent_shift_rms"]
    assert anchored["steps"] == 6 and set(anchored["after"]) == set(anchored["before"])
    config = _config(tmp_path / "anchored", anchor_weight=1000.0)
    shipped = AutoencoderKL.from_pretrained(shipped_vae_folder(config)).eval()
    families = world_data.heldout_families(config)
    assert world_vae.reconstruction_report(shipped, families) == anchored["after"]
    reference = _ship_tiny_vae(dataclasses.replace(config, output=str(tmp_path / "reference")))
    shift = world_vae.latent_shift(shipped, reference, families["world"])
    assert round(shift, 4) == anchored["world_latent_shift_rms"]


def test_widen_ships_a_wider_vae_that_starts_from_the_shipped_function(tmp_path):
    config = _config(tmp_path, widen=2, lr=0.0)
    _ship_tiny_vae(config)
    world_vae_broad.train_vae_broad(config)
    record = json.loads((tmp_path / "out" / "train_metrics.json").read_text())["vae_broad"]
    shipped = AutoencoderKL.from_pretrained(shipped_vae_folder(config))
    assert list(shipped.config.block_out_channels) == [16, 32, 32]
    # At lr 0 its steps change nothing: the wider VAE reconstructs as the old one did and keeps its latents.
    assert record["after"] == record["before"]
    assert record["world_latent_shift_rms"] < 1e-5


def test_a_widening_factor_below_one_is_a_config_error_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match="vae_broad.widen must be an integer >= 1"):
        _config(tmp_path, widen=0)


def test_the_stage_trains_with_its_frequency_weight(tmp_path, loss_spy):
    weights = loss_spy(world_vae_broad)
    config = _config(tmp_path, steps=2, frequency_weight=1.5)
    _ship_tiny_vae(config)
    world_vae_broad.train_vae_broad(config)
    assert weights == [1.5, 1.5]
