"""The shapes world's UNet stage pieces: the diffusion loss and its object weighting."""

import numpy as np
import torch

from pipeline.training.world_unet import ddpm_scheduler, diffusion_loss, object_loss_weights


def test_diffusion_loss_reduces_to_mse_and_follows_min_snr():
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
    masks = np.zeros((2, 64, 64), dtype=bool)
    masks[0, :4, :4] = True  # exactly one latent pixel of a 16x16 grid
    masks[1, :2, :4] = True  # half of one latent pixel
    weights = object_loss_weights(masks, 16, object_weight=4.0)
    assert weights.shape == (2, 1, 16, 16)
    assert weights[0, 0, 0, 0] == 5.0 and weights[1, 0, 0, 0] == 3.0
    assert torch.all(weights[:, :, 1:, :] == 1.0) and torch.all(weights[:, :, :, 1:] == 1.0)
