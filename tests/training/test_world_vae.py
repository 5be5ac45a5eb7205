"""The shapes world's VAE stage pieces: the held-out PSNR, reconstructions, and the shipped VAE."""

import dataclasses

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio

from pipeline.models.build import SDArchitecture, build_vae
from pipeline.training.world_config import DEFAULT_CONFIG, load_train_config
from pipeline.training.world_vae import shipped_vae, vae_psnr, vae_reconstructions
from pipeline.world import generator


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
