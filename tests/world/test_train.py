"""Training-job pieces: strict config loading, the step/time budget, and the held-out PSNR."""

import dataclasses

import numpy as np
import pytest
import torch
import yaml
from skimage.metrics import peak_signal_noise_ratio

from pipeline.models.build import SDArchitecture, build_vae
from pipeline.world import generator
from pipeline.world.train import (
    DEFAULT_CONFIG,
    Budget,
    blur_images,
    load_config,
    load_in_memory,
    random_blur,
    shipped_vae,
    vae_psnr,
    vae_reconstructions,
)


def test_shipped_job_config_loads_and_holds_valid_captions():
    config = load_config(DEFAULT_CONFIG)
    assert config.unet.batch > 0 and config.vae.channels[0] > 0
    for caption in config.data.heldout_captions:
        assert len(generator.parse_caption(caption)["objects"]) == 1


def test_unknown_config_key_is_named(tmp_path):
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    raw["unet"]["learning_rate"] = 0.1
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="learning_rate"):
        load_config(path)


def test_bad_heldout_caption_is_rejected(tmp_path):
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    raw["data"]["heldout_captions"] = ["a pink circle on a white background"]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="pink"):
        load_config(path)


def test_budget_stops_at_steps_and_decays_lr():
    budget = Budget(steps=10, max_minutes=60)
    factors = []
    while budget.running():
        factors.append(budget.lr_factor(warmup_steps=2))
        budget.step += 1
    assert budget.step == 10
    assert factors[0] < factors[1] and factors[-1] < factors[2]


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


def test_diffusion_loss_reduces_to_mse_and_follows_min_snr():
    from pipeline.world.train import ddpm_scheduler, diffusion_loss

    scheduler = ddpm_scheduler()
    generator = torch.Generator().manual_seed(0)
    prediction, noise = (
        torch.randn(4, 4, 8, 8, generator=generator),
        torch.randn(4, 4, 8, 8, generator=generator),
    )
    timesteps = torch.tensor([0, 10, 500, 999])
    plain = diffusion_loss(prediction, noise, timesteps, scheduler, torch.ones(1), None)
    assert torch.allclose(plain, torch.nn.functional.mse_loss(prediction, noise))
    # Min-SNR-gamma: per-sample weight min(SNR, gamma) / SNR with SNR = a_bar / (1 - a_bar).
    gamma = 5.0
    weighted = diffusion_loss(prediction, noise, timesteps, scheduler, torch.ones(1), gamma)
    alpha_bar = scheduler.alphas_cumprod[timesteps].double()
    snr = alpha_bar / (1 - alpha_bar)
    per_sample = ((prediction - noise).double() ** 2).mean(dim=(1, 2, 3))
    expected = (per_sample * torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64)) / snr).mean()
    assert torch.allclose(weighted.double(), expected, rtol=1e-5)
    # Low-noise steps (high SNR) are down-weighted, the noisiest step keeps weight 1.
    assert snr[0] > gamma and snr[-1] < gamma


def test_object_loss_weights_follow_mask_coverage():
    from pipeline.world.train import object_loss_weights

    masks = np.zeros((2, 64, 64), dtype=bool)
    masks[0, :4, :4] = True  # exactly one latent pixel of a 16x16 grid
    masks[1, :2, :4] = True  # half of one latent pixel
    weights = object_loss_weights(masks, 16, object_weight=4.0)
    assert weights.shape == (2, 1, 16, 16)
    assert weights[0, 0, 0, 0] == 5.0 and weights[1, 0, 0, 0] == 3.0
    assert torch.all(weights[:, :, 1:, :] == 1.0) and torch.all(weights[:, :, :, 1:] == 1.0)


def test_model_loaded_in_memory_survives_its_folder_being_rewritten(tmp_path):
    """The unet stage reads the VAE it resumes with from the folder it then writes: the loaded weights must
    not stay mapped to the file (rewriting a mapped file under a live model is a bus error)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    build_vae(SDArchitecture(image_size=32, vae_channels=(8, 16))).save_pretrained(tmp_path)
    vae = load_in_memory(AutoencoderKL, tmp_path)
    before = [parameter.clone() for parameter in vae.parameters()]
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 64)
    assert all(torch.equal(a, b) for a, b in zip(before, vae.parameters(), strict=True))


def test_oracle_blur_augmentation_blurs_about_half_and_keeps_the_rest():
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.uniform(-1, 1, size=(64, 3, 16, 16)).astype(np.float32))
    blurred = random_blur(images, 1.5, np.random.default_rng(1))
    changed = (blurred != images).flatten(1).any(dim=1)
    assert 16 <= int(changed.sum()) <= 48
    # A blur averages neighbours: it lowers the pixel variance of noise, never raises it.
    assert (blurred[changed].flatten(1).var(dim=1) < images[changed].flatten(1).var(dim=1)).all()
    assert torch.equal(random_blur(images, 0.0, np.random.default_rng(1)), images)


def test_blur_keeps_flat_images_and_softens_edges():
    flat = np.full((1, 16, 16, 3), 77, dtype=np.uint8)
    assert np.array_equal(blur_images(flat, 1.5), flat)
    edge = np.zeros((1, 16, 16, 3), dtype=np.uint8)
    edge[:, :, 8:] = 255
    row = blur_images(edge, 1.5)[0, 8, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255 and 0 < row[7] < row[8] < 255


def test_oracle_on_decoded_images_names_the_missing_vae(tmp_path):
    config = dataclasses.replace(load_config(DEFAULT_CONFIG), output=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="decoded_fraction"):
        shipped_vae(config)
