"""The `vae-broad` stage: fine-tune the shipped VAE so it reconstructs images off the world's palette.

A real Stable Diffusion VAE reconstructs any image; the world's VAE, trained on its own palette, caps
every inversion of anything else. Retraining the VAE from scratch would move the latent space and force
the UNet to be retrained (hours on CPU); instead this stage fine-tunes encoder and decoder on a mix of
the world's scenes and off-palette scenes (`pipeline.world.broad`) while anchoring the encoder's
posterior mean on the world's scenes to the shipped encoder's (a distillation term), so the UNet keeps
the latents it was trained on. With `vae_broad.widen` > 1 the shipped VAE is first made wider with its
function kept (`pipeline.models.widen`): more capacity, starting from the same reconstructions and the
same latents.

Loss per step, with x_w world scenes, x_o off-palette scenes, E/D the trained encoder/decoder, E_0 the
shipped encoder, s the latent scaling factor:

    MSE(D(E(x)), x) + L1(D(E(x)), x)  over x = x_w and x_o
    + anchor_weight * MSE(s * mean E(x_w), s * mean E_0(x_w))
    + kl_weight * KL / pixels                                   (the vae stage's KL weight)
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from pipeline.models.widen import widen_autoencoder
from pipeline.training.loop import (
    Budget,
    MetricsLog,
    optimize,
    replace_folder,
    seed_everything,
    training_device,
)
from pipeline.training.world_config import TrainConfig
from pipeline.training.world_data import heldout_families, off_palette_mix, training_scenes
from pipeline.training.world_vae import (
    cached_vae_folder,
    latent_shift,
    reconstruction_loss,
    reconstruction_report,
    shipped_vae,
    shipped_vae_folder,
)
from pipeline.world.oracle import images_to_tensor

VAE_BROAD_SEED_OFFSET = 6
EVALUATE_EVERY = 1000  # steps between held-out progress lines


def broad_batch(rng: np.random.Generator, world: np.ndarray, config: TrainConfig, step: int) -> np.ndarray:
    """One batch of the stage, uint8 (batch, 64, 64, 3): `world_data.off_palette_mix` with vae_broad's shares."""
    settings = config.vae_broad
    return off_palette_mix(
        rng,
        world,
        settings.batch,
        settings.world_fraction,
        settings.near_fraction,
        step,
        settings.backgrounds,
    )


def train_vae_broad(config: TrainConfig) -> AutoencoderKL:
    """Fine-tune the shipped VAE on broad scenes with the world's latents anchored (module docstring).

    Writes the result over OUTPUT/shapes-sd/vae and CACHE/vae and records, before and after, the mean
    and worst held-out PSNR of the world's, broad and near scenes and the world latents' RMS shift.

    Args:
        config: the training job.

    Returns:
        The fine-tuned VAE, on the CPU in eval mode.
    """
    rng = seed_everything(config.seed + VAE_BROAD_SEED_OFFSET)
    settings = config.vae_broad
    world = training_scenes(config).images
    families = heldout_families(config)
    reference = shipped_vae(config)
    reference.requires_grad_(False)
    before = reconstruction_report(reference, families)
    device = training_device()
    vae = widen_autoencoder(reference, settings.widen, seed=config.seed).to(device).train()
    vae.requires_grad_(True)
    teacher = copy.deepcopy(reference).to(device)
    scale = reference.config.scaling_factor
    n_world = round(settings.batch * settings.world_fraction)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.lr, weight_decay=0.0)
    budget = Budget(settings.steps, settings.max_minutes)

    def loss_step() -> torch.Tensor:
        images = images_to_tensor(broad_batch(rng, world, config, budget.step)).to(device)
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        with torch.no_grad():
            anchored = teacher.encode(images[:n_world]).latent_dist.mean * scale
        anchor = F.mse_loss(posterior.mean[:n_world] * scale, anchored)
        kl = posterior.kl().mean() / images[0].numel()
        return (
            reconstruction_loss(reconstruction, images, settings.frequency_weight)
            + settings.anchor_weight * anchor
            + config.vae.kl_weight * kl
        )

    def report_progress(step: int) -> None:
        if step % EVALUATE_EVERY == 0:
            vae.eval()
            print(f"[vae-broad] step {step} held-out {reconstruction_report(vae, families)}", flush=True)
            vae.train()

    optimize(loss_step, optimizer, budget, stage="vae-broad", peak_lr=settings.lr, after_step=report_progress)
    vae.cpu().eval()
    after = reconstruction_report(vae, families)
    shift = latent_shift(vae, reference, families["world"])
    for folder in (shipped_vae_folder(config), cached_vae_folder(config)):
        if folder.is_dir():
            replace_folder(folder, lambda staging: vae.save_pretrained(staging, safe_serialization=True))
        else:
            vae.save_pretrained(folder, safe_serialization=True)
    MetricsLog(config.output).record(
        "vae_broad",
        {
            "steps": budget.step,
            "wall_s": round(budget.elapsed),
            "before": before,
            "after": after,
            "world_latent_shift_rms": round(shift, 4),
        },
    )
    return vae
