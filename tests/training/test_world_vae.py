"""The shapes world's VAE stage: the held-out PSNR, reconstructions, the shipped VAE, the code's channels and
the off-palette training mix."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from skimage.metrics import peak_signal_noise_ratio

from pipeline.config import ConfigError
from pipeline.models.build import SDArchitecture, build_vae
from pipeline.training import cli, world_data, world_vae
from pipeline.training.world_config import DEFAULT_CONFIG, load_train_config
from pipeline.training.world_vae import shipped_vae, vae_psnr, vae_reconstructions
from pipeline.world import broad, generator
from pipeline.world.oracle import images_to_tensor


@torch.no_grad()
def test_vae_psnr_agrees_with_skimage():
    torch.manual_seed(0)
    vae = build_vae(SDArchitecture(image_size=64, vae_channels=(8, 16, 16))).eval()
    images = np.stack([generator.render(generator.sample_scene(seed)).image for seed in range(4)])
    ours = vae_psnr(vae, images)
    batch = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    reconstruction = vae.decode(vae.encode(batch).latent_dist.mode()).sample.clamp(-1, 1)
    pixels = ((reconstruction + 1) * 127.5).round().permute(0, 2, 3, 1).numpy().astype(np.uint8)
    reference = np.mean(
        [peak_signal_noise_ratio(a, b, data_range=255) for a, b in zip(images, pixels, strict=True)]
    )
    assert abs(ours - reference) < 1e-3
    # The oracle's decoded training images are the same reconstructions, as uint8.
    assert np.array_equal(vae_reconstructions(vae, images), pixels)


def test_oracle_on_decoded_images_names_the_missing_vae(tmp_path):
    config = dataclasses.replace(load_train_config(DEFAULT_CONFIG), output=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="decoded_fraction"):
        shipped_vae(config)


def _tiny_vae_job(tmp_path, **vae):
    settings = {"channels": "[8,16,16]", "steps": 2, "batch": 6, "max_minutes": 5} | vae
    overrides = [f"output={tmp_path / 'out'}", f"cache_dir={tmp_path / 'cache'}", "data.train_scenes=24",
                 "data.heldout_scenes=4", "vae_broad.heldout_scenes=4"]  # fmt: skip
    overrides += [f"vae.{key}={value}" for key, value in settings.items()]
    return load_train_config(DEFAULT_CONFIG, overrides)


def _spy_on_mix(monkeypatch) -> list[dict]:
    calls = []

    def recording_mix(*args, **kwargs):
        batch = world_data.off_palette_mix(*args, **kwargs)
        calls.append({"args": args, "kwargs": kwargs, "shape": batch.shape})
        return batch

    monkeypatch.setattr(world_vae, "off_palette_mix", recording_mix)
    return calls


def test_the_vae_stage_trains_a_denser_code_on_the_off_palette_mix(tmp_path, monkeypatch):
    config = _tiny_vae_job(tmp_path, latent_channels=8, world_fraction=0.5, near_fraction=0.25)
    config = dataclasses.replace(config, vae_decoder=dataclasses.replace(config.vae_decoder, steps=2))
    calls = _spy_on_mix(monkeypatch)
    vae = world_vae.train_vae(config)
    # Every step drew its batch from the mix: 3 world, 1 near and 2 broad scenes, seeds of step 0 and 1.
    assert [call["shape"] for call in calls] == [(6, 64, 64, 3)] * 2
    assert [call["args"][2:6] for call in calls] == [(6, 0.5, 0.25, 0), (6, 0.5, 0.25, 1)]
    assert all(call["args"][6] == broad.BROAD_BACKGROUNDS for call in calls)
    assert all(call["kwargs"]["stage"] == "vae" for call in calls)
    saved = AutoencoderKL.from_pretrained(world_vae.cached_vae_folder(config))
    pixels = torch.zeros(1, 3, 64, 64)
    assert saved.encode(pixels).latent_dist.mode().shape == (1, 8, 16, 16)
    assert vae.config.latent_channels == 8
    record = json.loads((tmp_path / "out" / "train_metrics.json").read_text())["vae"]
    assert record["latent_channels"] == 8
    families = world_data.heldout_families(config)
    assert record["heldout"] == world_vae.reconstruction_report(saved, families)
    # The decoder is fine-tuned on the same mix, seeds from its own steps, the encoder kept.
    calls.clear()
    tuned = world_vae.train_vae_decoder(config)
    assert [call["args"][2:6] for call in calls] == [(16, 0.5, 0.25, 0), (16, 0.5, 0.25, 1)]
    assert all(call["kwargs"]["stage"] == "vae_decoder" for call in calls)
    assert torch.equal(tuned.encoder.conv_in.weight, saved.encoder.conv_in.weight)
    assert not torch.equal(tuned.decoder.conv_out.weight, saved.decoder.conv_out.weight)
    record = json.loads((tmp_path / "out" / "train_metrics.json").read_text())["vae_decoder"]
    assert record["heldout"] == world_vae.reconstruction_report(tuned, families)


def test_a_vae_batch_draws_its_broad_scenes_from_the_configured_background_kinds(tmp_path):
    config = _tiny_vae_job(
        tmp_path, world_fraction=0.5, near_fraction=0.25, backgrounds="[checkered,striped]"
    )
    world = world_data.training_scenes(config).images
    batch = world_vae.training_batch(np.random.default_rng(0), world, config, batch=8, step=3, stage="vae")
    # Step 3 of batch 8 draws seeds 24..27 for its four off-palette scenes: two near, two broad.
    assert np.array_equal(batch[4:6], broad.near_images(range(24, 26)))
    weighted = broad.broad_images(range(26, 28), ("checkered", "striped"))
    assert np.array_equal(batch[6:], weighted)
    assert not np.array_equal(weighted, broad.broad_images(range(26, 28)))


def test_a_resumed_vae_stage_draws_the_scenes_after_those_it_was_trained_on(tmp_path, monkeypatch):
    config = _tiny_vae_job(tmp_path, world_fraction=0.5, near_fraction=0.25)
    calls = _spy_on_mix(monkeypatch)
    world_vae.train_vae(config)
    world_vae.train_vae(config, resume=True)
    # Seeds of steps 0 and 1, then of steps 2 and 3 (not 0 and 1 again); a second resume goes on at 4.
    assert [call["args"][5] for call in calls] == [0, 1, 2, 3]
    calls.clear()
    world_vae.train_vae(config, resume=True)
    assert [call["args"][5] for call in calls] == [4, 5]
    # Training from scratch starts the stream again.
    calls.clear()
    world_vae.train_vae(config)
    assert [call["args"][5] for call in calls] == [0, 1]


def test_the_vae_stage_on_the_world_alone_never_draws_off_palette_scenes(tmp_path, monkeypatch):
    calls = _spy_on_mix(monkeypatch)
    config = _tiny_vae_job(tmp_path)
    vae = world_vae.train_vae(config)
    config = dataclasses.replace(config, vae_decoder=dataclasses.replace(config.vae_decoder, steps=2))
    world_vae.train_vae_decoder(config)
    assert calls == []
    assert vae.config.latent_channels == 4


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("vae.latent_channels=0", r"vae.latent_channels must be an integer >= 1"),
        ("vae.world_fraction=0.9", r"vae.world_fraction and vae.near_fraction must be >= 0 with a sum <= 1"),
        ("vae.near_fraction=-0.1", r"vae.world_fraction and vae.near_fraction must be >= 0"),
        ("vae.frequency_weight=-1", r"vae.frequency_weight must be >= 0"),
        ("vae_decoder.frequency_weight=-0.5", r"vae_decoder.frequency_weight must be >= 0"),
        ("vae_broad.frequency_weight=-2", r"vae_broad.frequency_weight must be >= 0"),
        ("vae.backgrounds=[stripy]", r"vae.backgrounds must name kinds among \['solid'"),
        ("vae.backgrounds=[]", r"vae.backgrounds must name kinds among"),
    ],
)
def test_bad_vae_code_or_mix_is_a_config_error_naming_the_key(override, message):
    overrides = [override, "vae.near_fraction=0.2"] if "world" in override else [override]
    with pytest.raises(ConfigError, match=message):
        load_train_config(DEFAULT_CONFIG, overrides)


def _cosine(frequency: tuple[int, int], amplitude: float) -> torch.Tensor:
    """amplitude * cos(2 pi (fy y + fx x) / 64) in every channel, float (1, 3, 64, 64)."""
    ys, xs = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    wave = amplitude * torch.cos(2 * torch.pi * (frequency[0] * ys + frequency[1] * xs) / 64)
    return wave.expand(1, 3, 64, 64).clone()


def test_the_frequency_term_weights_each_frequency_of_the_error_by_its_own_error():
    # An error of two cosines, amplitudes a > b: by Parseval each holds a^2 / 2 and b^2 / 2 of the mean
    # squared error; the focal weights (|error spectrum| over its maximum) are 1 and b / a. The second
    # image's error is the first's negated and halved: each image's spectrum and weights are its own (no
    # batch average, no batch-wide maximum), so its term is a quarter of the first's.
    a, b = 0.4, 0.1
    images = torch.rand(2, 3, 64, 64) * 0.5
    error = _cosine((0, 5), a) + _cosine((3, 0), b)
    reconstruction = images + torch.cat([error, -0.5 * error])
    plain = world_vae.reconstruction_loss(reconstruction, images)
    torch.testing.assert_close(
        plain,
        torch.nn.functional.mse_loss(reconstruction, images) + (reconstruction - images).abs().mean(),
    )
    focal = world_vae.reconstruction_loss(reconstruction, images, frequency_weight=3.0) - plain
    torch.testing.assert_close(
        focal, torch.tensor(3.0 * (1 + 0.25) / 2 * (a**2 / 2 + (b / a) * b**2 / 2)), rtol=1e-4, atol=1e-6
    )
    assert world_vae.reconstruction_loss(images, images, frequency_weight=3.0) == 0


def test_each_vae_stage_trains_with_its_own_frequency_weight(tmp_path, loss_spy):
    weights = loss_spy(world_vae)
    config = _tiny_vae_job(tmp_path, frequency_weight=2.0)
    decoder = dataclasses.replace(config.vae_decoder, steps=3, batch=4, frequency_weight=0.5)
    config = dataclasses.replace(config, vae_decoder=decoder)
    world_vae.train_vae(config)
    world_vae.train_vae_decoder(config)
    assert weights == [2.0, 2.0, 0.5, 0.5, 0.5]


def _weights(vae: AutoencoderKL, part: str) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in getattr(vae, part).state_dict().items()}


def _same(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)


def test_the_resumed_vae_stage_trains_the_cached_vae_on_encoder_and_decoder_together(tmp_path):
    config = _tiny_vae_job(tmp_path, latent_channels=8)
    config = dataclasses.replace(config, vae_decoder=dataclasses.replace(config.vae_decoder, steps=2))
    world_vae.train_vae(config)
    tuned = world_vae.train_vae_decoder(config)
    encoder, decoder = _weights(tuned, "encoder"), _weights(tuned, "decoder")
    # At a zero learning rate the resumed stage returns the cached VAE as it was, tuned decoder and all.
    still = dataclasses.replace(config, vae=dataclasses.replace(config.vae, lr=0.0))
    kept = world_vae.train_vae(still, resume=True)
    assert _same(_weights(kept, "encoder"), encoder) and _same(_weights(kept, "decoder"), decoder)
    resumed = world_vae.train_vae(config, resume=True)
    assert not _same(_weights(resumed, "encoder"), encoder)
    assert not _same(_weights(resumed, "decoder"), decoder)
    records = json.loads((tmp_path / "out" / "train_metrics.json").read_text())
    assert "vae_decoder" not in records
    record = records["vae"]
    assert (record["steps"], record["resumed_after_steps"], record["total_steps"]) == (2, 4, 6)
    # The latent space moved: its scaling factor is measured again, on the VAE saved in the cache.
    saved = AutoencoderKL.from_pretrained(world_vae.cached_vae_folder(config))
    assert _same(_weights(saved, "encoder"), _weights(resumed, "encoder"))
    scenes = world_data.training_scenes(config).images[:2048]
    assert record["scaling_factor"] == world_vae.latent_scaling_factor(saved, scenes)
    assert saved.config.scaling_factor == record["scaling_factor"]


def test_resuming_the_vae_stage_without_a_fitting_cached_vae_exits_naming_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "set_num_threads", lambda threads: None)  # the command sets the process's
    overrides = [f"output={tmp_path / 'out'}", f"cache_dir={tmp_path / 'cache'}",
                  "vae.channels=[8,16,16]", "vae.steps=1", "vae.batch=2", "data.train_scenes=8",
                  "data.heldout_scenes=2", "vae_broad.heldout_scenes=2"]  # fmt: skip
    arguments = ["vae", "--resume", "--config", str(DEFAULT_CONFIG), "--threads", "1"]
    arguments += [item for override in overrides for item in ("--set", override)]
    with pytest.raises(SystemExit, match=r"^error: vae: --resume: no VAE in .*run the vae stage without"):
        cli.main(arguments)
    cli.main(arguments[:1] + arguments[2:])
    with pytest.raises(
        SystemExit, match=r"has channels \[8, 16, 16\] and latent_channels 4, the job asks for"
    ):
        cli.main([*arguments, "--set", "vae.latent_channels=8"])
    with pytest.raises(SystemExit, match=r"asks for \[8, 16, 32\] and 4; set vae.channels"):
        cli.main([*arguments, "--set", "vae.channels=[8,16,32]"])


def test_a_widened_resume_grows_the_cached_vae_keeping_its_function(tmp_path):
    config = _tiny_vae_job(tmp_path, latent_channels=8)
    cached = world_vae.train_vae(config)
    images = world_data.heldout_scenes(config).images
    still_wider = dataclasses.replace(config, vae=dataclasses.replace(config.vae, lr=0.0, widen=2))
    wide = world_vae.train_vae(still_wider, resume=True)
    saved = AutoencoderKL.from_pretrained(world_vae.cached_vae_folder(config))
    assert list(saved.config.block_out_channels) == [16, 32, 32] and saved.config.latent_channels == 8
    assert _same(_weights(saved, "encoder"), _weights(wide, "encoder"))
    # Net2WiderNet: at lr 0 the wider VAE encodes and decodes as the cached one did.
    pixels = images_to_tensor(images)
    with torch.no_grad():
        narrow_latents = cached.encode(pixels).latent_dist.mode()
        wide_latents = saved.encode(pixels).latent_dist.mode()
        assert torch.allclose(wide_latents, narrow_latents, atol=1e-4)
        assert torch.allclose(
            saved.decode(narrow_latents).sample, cached.decode(narrow_latents).sample, atol=1e-4
        )
    record = json.loads((tmp_path / "out" / "train_metrics.json").read_text())["vae"]
    assert (record["channels"], record["widened"], record["total_steps"]) == ([16, 32, 32], 2, 4)
    # The grown VAE is trained on under its own widths, unwidened.
    wider = dataclasses.replace(config, vae=dataclasses.replace(config.vae, channels=(16, 32, 32)))
    trained = world_vae.train_vae(wider, resume=True)
    assert not _same(_weights(trained, "encoder"), _weights(saved, "encoder"))
    assert json.loads((tmp_path / "out" / "train_metrics.json").read_text())["vae"]["total_steps"] == 6


def test_a_latent_widened_resume_grows_the_code_keeping_the_decoded_images(tmp_path):
    config = _tiny_vae_job(tmp_path, latent_channels=4)
    cached = world_vae.train_vae(config)
    grown_job = dataclasses.replace(config, vae=dataclasses.replace(config.vae, lr=0.0, latent_widen=2))
    grown = world_vae.train_vae(grown_job, resume=True)
    saved = AutoencoderKL.from_pretrained(world_vae.cached_vae_folder(config))
    assert saved.config.latent_channels == 8 and list(saved.config.block_out_channels) == [8, 16, 16]
    assert _same(_weights(saved, "decoder"), _weights(grown, "decoder"))
    pixels = images_to_tensor(world_data.heldout_scenes(config).images)
    with torch.no_grad():
        old_latents = cached.encode(pixels).latent_dist.mode()
        new_latents = saved.encode(pixels).latent_dist.mode()
        assert torch.allclose(new_latents[:, :4], old_latents, atol=1e-4)
        assert torch.allclose(saved.decode(new_latents).sample, cached.decode(old_latents).sample, atol=1e-4)
    record = json.loads((tmp_path / "out" / "train_metrics.json").read_text())["vae"]
    assert (record["latent_channels"], record["latent_widened"], record["total_steps"]) == (8, 2, 4)
    # The grown VAE is resumed under its own latent channels, not grown again.
    with pytest.raises(ConfigError, match=r"latent_channels 8, the job asks for \[8, 16, 16\] and 4"):
        world_vae.train_vae(config, resume=True)


def test_latent_widening_without_a_cached_vae_is_a_config_error_naming_the_fix(tmp_path):
    with pytest.raises(ConfigError, match=r"vae.latent_widen=2 grows the VAE in the cache: add --resume"):
        world_vae.train_vae(_tiny_vae_job(tmp_path, latent_widen=2))
    with pytest.raises(ConfigError, match=r"vae.latent_widen must be an integer >= 1"):
        _tiny_vae_job(tmp_path, latent_widen=0)


def test_widening_without_a_cached_vae_to_grow_is_a_config_error_naming_the_fix(tmp_path):
    with pytest.raises(ConfigError, match=r"vae.widen=2 grows the VAE in the cache: add --resume"):
        world_vae.train_vae(_tiny_vae_job(tmp_path, widen=2))
    with pytest.raises(ConfigError, match=r"vae.widen must be an integer >= 1"):
        _tiny_vae_job(tmp_path, widen=0)
