"""The shapes world's VAE: AutoencoderKL 64x64x3 -> 16x16xC (C = vae.latent_channels, 4 as shipped) trained
from scratch on the world's scenes or a mix with off-palette ones (`vae` stage; `--resume` trains the cached
VAE on, encoder and decoder together), and decoder-only fine-tuning that keeps the latent space
(`vae-decoder` stage).

Both stages keep the VAE in CACHE/vae; the unet stage ships it in OUTPUT/shapes-sd/vae.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from focal_frequency_loss import FocalFrequencyLoss

from pipeline.config import ConfigError
from pipeline.metrics.pixel import psnr
from pipeline.models.build import SDArchitecture, build_vae
from pipeline.models.widen import widen_autoencoder, widen_latent
from pipeline.training.loop import (
    Budget,
    MetricsLog,
    Progress,
    load_in_memory,
    optimize,
    replace_folder,
    seed_everything,
    training_device,
)
from pipeline.training.world_config import TrainConfig
from pipeline.training.world_data import (
    heldout_families,
    heldout_scenes,
    off_palette_mix,
    shipped_vae_folder,
    training_scenes,
)
from pipeline.world import generator
from pipeline.world.oracle import images_to_tensor

VAE_SEED_OFFSET = 1
VAE_DECODER_SEED_OFFSET = 4


def sd_architecture(config: TrainConfig) -> SDArchitecture:
    """The SD architecture (VAE, UNet, text encoder) the job describes, at the world's image size."""
    unet = config.unet
    return SDArchitecture(
        image_size=generator.IMAGE_SIZE,
        latent_channels=config.vae.latent_channels,
        vae_channels=config.vae.channels,
        unet_channels=unet.channels,
        unet_plain_levels=unet.plain_levels,
        unet_attention_head_dim=unet.attention_head_dim,
        text_width=unet.text_width,
        text_layers=unet.text_layers,
        text_heads=unet.text_heads,
        text_intermediate=unet.text_intermediate,
    )


def cached_vae_folder(config: TrainConfig) -> Path:
    """CACHE/vae: the VAE the vae and vae-decoder stages write and a fresh unet stage reads."""
    return Path(config.cache_dir) / "vae"


def reconstruction_loss(
    reconstruction: torch.Tensor, images: torch.Tensor, frequency_weight: float = 0.0
) -> torch.Tensor:
    """The VAE stages' reconstruction loss: MSE + L1, plus the focal frequency loss when weighted.

    The focal frequency loss (Jiang et al., ICCV 2021; the authors' `focal_frequency_loss` package, alpha 1)
    is the squared distance between the two images' 2-D spectra, each frequency weighted by its own
    current error (normalised to [0, 1] per image and channel): a blurred reconstruction of a stripe
    pattern misses its frequencies most, and those are pushed hardest.

    Args:
        reconstruction: the decoder's output in [-1, 1], float (B, 3, H, W).
        images: the scenes in [-1, 1], float (B, 3, H, W).
        frequency_weight: weight of the focal frequency loss; 0 leaves MSE + L1.

    Returns:
        The scalar loss.
    """
    loss = F.mse_loss(reconstruction, images) + F.l1_loss(reconstruction, images)
    if frequency_weight > 0.0:
        loss = loss + frequency_weight * FocalFrequencyLoss()(reconstruction, images)
    return loss


def training_batch(
    rng: np.random.Generator, world: np.ndarray, config: TrainConfig, batch: int, step: int, stage: str
) -> np.ndarray:
    """One batch of the vae or vae-decoder stage, uint8 (batch, 64, 64, 3).

    The world's training scenes alone when `vae.world_fraction` is 1, else `world_data.off_palette_mix`
    with `vae.world_fraction`, `vae.near_fraction` and `vae.backgrounds`: the decoder is fine-tuned on
    the scenes the VAE learnt from.

    Args:
        rng: draws the world scenes.
        world: the world's training scenes, uint8 (N, 64, 64, 3).
        config: the training job.
        batch: scenes in the batch.
        step: the stage's training step (picks the off-palette seeds).
        stage: the config section whose steps and batch the off-palette seeds come from.
    """
    if config.vae.world_fraction == 1.0:
        return world[rng.choice(len(world), batch)]
    return off_palette_mix(
        rng,
        world,
        batch,
        config.vae.world_fraction,
        config.vae.near_fraction,
        step,
        config.vae.backgrounds,
        stage=stage,
    )


def train_vae(config: TrainConfig, resume: bool = False) -> AutoencoderKL:
    """Train AutoencoderKL 64x64x3 -> 16x16xC (`reconstruction_loss` + small KL); scaling_factor: unit latent std.

    Batches come from `training_batch` (the world alone, or mixed with off-palette scenes). Saves
    CACHE/vae, records the world's held-out PSNR, the held-out world/near/broad report and the scaling
    factor, and drops the vae_decoder and vae_broad records (they fine-tuned the previous VAE).

    Args:
        config: the training job.
        resume: start from the VAE in CACHE/vae (e.g. one whose decoder the vae-decoder stage tuned) and
            train encoder and decoder on together, with a fresh step/time budget, instead of from random
            weights, its off-palette scenes drawn after those of the steps OUTPUT's record counts. With
            `vae.widen` > 1 it is first made wider, with `vae.latent_widen` > 1 given more latent
            channels, its function kept either way. The latent space may move, so a UNet trained on the
            old one must be retrained.

    Returns:
        The trained VAE, on the CPU in eval mode.

    Raises:
        ConfigError: `vae.widen` or `vae.latent_widen` > 1 without `resume` (there is no trained VAE to
            grow).
    """
    if config.vae.widen > 1 and not resume:
        raise ConfigError(
            f"vae.widen={config.vae.widen} grows the VAE in the cache: add --resume, or set vae.widen=1 "
            "and vae.channels to the widths to train from scratch"
        )
    if config.vae.latent_widen > 1 and not resume:
        raise ConfigError(
            f"vae.latent_widen={config.vae.latent_widen} grows the VAE in the cache: add --resume, or set "
            "vae.latent_widen=1 and vae.latent_channels to the channels to train from scratch"
        )
    rng = seed_everything(config.seed + VAE_SEED_OFFSET)
    data = training_scenes(config)
    device = training_device()
    log = MetricsLog(config.output)
    previous = Progress()
    if resume:
        vae, previous = _resumed_vae(config), log.progress("vae")
        if config.vae.widen > 1:
            vae = widen_autoencoder(vae, config.vae.widen, seed=config.seed)
        if config.vae.latent_widen > 1:
            vae = widen_latent(vae, config.vae.latent_widen)
    else:
        vae = build_vae(sd_architecture(config))
    vae = vae.to(device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae.lr, weight_decay=0.0)

    budget = Budget(config.vae.steps, config.vae.max_minutes)

    def loss_step() -> torch.Tensor:
        # A resumed run draws the off-palette scenes after those of the steps it resumes from (the
        # output's record of them), so resuming does not show the VAE the same scenes again.
        step = previous.steps + budget.step
        scenes = training_batch(rng, data.images, config, config.vae.batch, step, stage="vae")
        images = images_to_tensor(scenes).to(device)
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        kl = posterior.kl().mean() / images[0].numel()
        return (
            reconstruction_loss(reconstruction, images, config.vae.frequency_weight)
            + config.vae.kl_weight * kl
        )

    optimize(loss_step, optimizer, budget, stage="vae", peak_lr=config.vae.lr)
    vae.cpu().eval()
    scaling = latent_scaling_factor(vae, data.images[:2048])
    vae.register_to_config(scaling_factor=scaling)
    heldout_psnr = vae_psnr(vae, heldout_scenes(config).images)
    vae.save_pretrained(cached_vae_folder(config), safe_serialization=True)
    total = previous.after(budget)
    log.forget("vae_decoder")
    log.forget("vae_broad")
    log.record(
        "vae",
        {
            "steps": budget.step,
            "wall_s": round(budget.elapsed),
            "heldout_psnr_db": heldout_psnr,
            "scaling_factor": scaling,
            "latent_channels": int(vae.config.latent_channels),
            "channels": list(vae.config.block_out_channels),
            "widened": config.vae.widen,
            "latent_widened": config.vae.latent_widen,
            "heldout": reconstruction_report(vae, heldout_families(config)),
            "resumed_after_steps": previous.steps,
            "total_steps": total.steps,
            "total_wall_s": total.wall_s,
        },
    )
    return vae


def _resumed_vae(config: TrainConfig) -> AutoencoderKL:
    """The VAE in CACHE/vae, checked to have the job's `vae.channels` and `vae.latent_channels`.

    Raises:
        FileNotFoundError: no VAE in the cache.
        ConfigError: the cached VAE's widths or latent channels are not the job's.
    """
    folder = cached_vae_folder(config)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"--resume: no VAE in {folder}; run the vae stage without --resume first")
    vae = load_in_memory(AutoencoderKL, folder)
    saved = (tuple(vae.config.block_out_channels), int(vae.config.latent_channels))
    asked = (tuple(config.vae.channels), config.vae.latent_channels)
    if saved != asked:
        raise ConfigError(
            f"--resume: the VAE in {folder} has channels {list(saved[0])} and latent_channels {saved[1]}, "
            f"the job asks for {list(asked[0])} and {asked[1]}; set vae.channels and vae.latent_channels to "
            "the cached VAE's or train without --resume"
        )
    return vae


def train_vae_decoder(config: TrainConfig) -> AutoencoderKL:
    """Fine-tune only the VAE's decoder (post_quant_conv + decoder) for reconstruction.

    The encoder, and so the latent space the UNet learns, is untouched: this stage may run before, during
    or after the UNet stage, which saves whichever decoder is in the cache when it finishes. Its batches
    are the vae stage's kind (`training_batch`): with off-palette scenes in the mix, the decoder keeps
    learning them.

    Args:
        config: the training job.

    Returns:
        The fine-tuned VAE, on the CPU in eval mode (also written over CACHE/vae).
    """
    device = training_device()
    rng = seed_everything(config.seed + VAE_DECODER_SEED_OFFSET)
    data = training_scenes(config)
    folder = cached_vae_folder(config)
    vae = AutoencoderKL.from_pretrained(folder).to(device)
    vae.requires_grad_(False)
    parameters = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(parameters, lr=config.vae_decoder.lr, weight_decay=0.0)

    budget = Budget(config.vae_decoder.steps, config.vae_decoder.max_minutes)

    def loss_step() -> torch.Tensor:
        scenes = training_batch(
            rng, data.images, config, config.vae_decoder.batch, budget.step, "vae_decoder"
        )
        images = images_to_tensor(scenes).to(device)
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.sample()
        reconstruction = vae.decode(latents).sample
        return reconstruction_loss(reconstruction, images, config.vae_decoder.frequency_weight)

    optimize(loss_step, optimizer, budget, stage="vae-decoder", peak_lr=config.vae_decoder.lr)
    vae.cpu().eval()
    psnr = vae_psnr(vae, heldout_scenes(config).images)
    replace_folder(folder, lambda staging: vae.save_pretrained(staging, safe_serialization=True))
    MetricsLog(config.output).record(
        "vae_decoder",
        {
            "steps": budget.step,
            "wall_s": round(budget.elapsed),
            "heldout_psnr_db": psnr,
            "heldout": reconstruction_report(vae, heldout_families(config)),
        },
    )
    return vae


def shipped_vae(config: TrainConfig) -> AutoencoderKL:
    """The VAE of the shipped diffusers folder (OUTPUT/shapes-sd/vae), in eval mode on the CPU.

    Raises:
        FileNotFoundError: no VAE was shipped yet (the message names the stages that write it).
    """
    folder = shipped_vae_folder(config)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"no VAE in {folder}: the oracle stage with oracle.decoded_fraction > 0 reads the shipped VAE; "
            "run the vae, vae-decoder and unet stages first, or set decoded_fraction: 0"
        )
    return load_in_memory(AutoencoderKL, folder).eval()


@torch.no_grad()
def vae_reconstructions(vae, images: np.ndarray) -> np.ndarray:
    """decode(encode(x).mode()) of uint8 images (N, 64, 64, 3), as uint8 (N, 64, 64, 3)."""
    decoded = []
    for start in range(0, len(images), 256):
        latents = vae.encode(images_to_tensor(images[start : start + 256])).latent_dist.mode()
        decoded.append(decoded_images(vae, latents))
    return np.concatenate(decoded)


@torch.no_grad()
def decoded_images(vae, latents: torch.Tensor) -> np.ndarray:
    """decode(z) of unscaled latents (N, C, 16, 16), clamped and rounded to uint8 (N, 64, 64, 3)."""
    pixels = (vae.decode(latents).sample.clamp(-1, 1) + 1) * 127.5
    return pixels.round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def latent_scaling_factor(vae, images: np.ndarray) -> float:
    """1 / std of posterior samples: SD's convention that scaled latents have ~unit variance.

    Reseeds torch's global generator with 0 (the posterior samples are drawn from it).
    """
    torch.manual_seed(0)
    latents = torch.cat(
        [
            vae.encode(images_to_tensor(images[s : s + 256])).latent_dist.sample()
            for s in range(0, len(images), 256)
        ]
    )
    return float(1.0 / latents.std())


def psnr_per_image(reconstructions: np.ndarray, images: np.ndarray) -> np.ndarray:
    """PSNR in dB of each uint8 image pair (N, H, W, 3), on 0..255 pixels (`pipeline.metrics.pixel.psnr`)."""

    def unit(pixels: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(pixels).permute(0, 3, 1, 2).double() / 255.0

    return psnr(unit(reconstructions), unit(images)).numpy()


def reconstruction_report(vae: AutoencoderKL, families: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean and worst PSNR of decode(encode(x).mode()) per family, e.g. {'broad_psnr_mean_db': ...}."""
    report = {}
    for name, images in families.items():
        per_image = psnr_per_image(vae_reconstructions(vae, images), images)
        report[f"{name}_psnr_mean_db"] = round(float(per_image.mean()), 2)
        report[f"{name}_psnr_min_db"] = round(float(per_image.min()), 2)
    return report


@torch.no_grad()
def latent_shift(vae: AutoencoderKL, reference: AutoencoderKL, images: np.ndarray) -> float:
    """RMS distance between two encoders' scaled posterior means on `images`, in latent std units."""
    pixels = images_to_tensor(images)
    scale = reference.config.scaling_factor
    moved = vae.encode(pixels).latent_dist.mean * scale
    anchored = reference.encode(pixels).latent_dist.mean * scale
    return float((moved - anchored).pow(2).mean().sqrt())


@torch.no_grad()
def vae_psnr(vae, images: np.ndarray) -> float:
    """Mean PSNR (dB, on 0..255 pixels) of decode(encode(x).mode()) over `images` (N, 64, 64, 3) uint8."""
    return float(psnr_per_image(vae_reconstructions(vae, images), images).mean())
