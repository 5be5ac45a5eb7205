"""The shapes world's UNet and CLIP text encoder (`unet` stage), trained on cached VAE latents.

Writes the diffusers folder OUTPUT/shapes-sd (UNet, text encoder, tokenizer, the cached VAE, DDIM
scheduler). `--resume` continues from the weights saved there, with a fresh step/time budget.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel

from pipeline.config import ConfigError
from pipeline.models.build import build_text_encoder, build_unet, save_sd_folder, write_clip_tokenizer
from pipeline.training.loop import (
    Budget,
    MetricsLog,
    Progress,
    load_in_memory,
    optimize,
    seed_everything,
    training_device,
)
from pipeline.training.world_config import TrainConfig
from pipeline.training.world_data import SD_FOLDER_NAME, training_scenes
from pipeline.training.world_vae import cached_vae_folder, sd_architecture
from pipeline.world.oracle import images_to_tensor

UNET_SEED_OFFSET = 3


def ddpm_scheduler() -> DDPMScheduler:
    """SD's training noise schedule: scaled_linear betas 0.00085..0.012 over 1000 steps, epsilon target."""
    return DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", clip_sample=False,
    )  # fmt: skip


def encoder_digest(vae: AutoencoderKL) -> str:
    """16 hex digits of SHA-256 over encoder, quant_conv and scaling factor: what makes the latents."""
    digest = hashlib.sha256(f"{vae.config.scaling_factor:.8f}".encode())
    modules = {"encoder": vae.encoder, "quant_conv": vae.quant_conv}
    for prefix, module in modules.items():
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(f"{prefix}.{name}".encode())
            digest.update(tensor.detach().cpu().float().numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def cache_latents(config: TrainConfig, vae, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every training image, (N, C, 16, 16) each; cached on disk.

    The cache is keyed by the encoder's weights, so a VAE trained or fine-tuned again is encoded again.
    """
    path = Path(config.cache_dir) / f"latents_{config.seed}_{len(images)}_{encoder_digest(vae)}.pt"
    if path.is_file():
        cached = torch.load(path)
        return cached["mean"], cached["std"]
    means, stds = [], []
    for start in range(0, len(images), 256):
        posterior = vae.encode(images_to_tensor(images[start : start + 256]).to(vae.device)).latent_dist
        means.append(posterior.mean.cpu())
        stds.append(posterior.std.cpu())
    mean, std = torch.cat(means), torch.cat(stds)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"mean": mean, "std": std}, path)
    return mean, std


def object_loss_weights(object_masks: np.ndarray, latent_size: int, object_weight: float) -> torch.Tensor:
    """Per-latent-pixel loss weights (N, 1, h, w): 1 + object_weight * (fraction of the pixel on an object).

    Objects cover a small part of each scene, so an unweighted loss is dominated by the background (and
    the textured backgrounds are the hardest part to fit); weighting the objects makes shape and colour,
    which the captions name, a larger share of the gradient.
    """
    masks = torch.as_tensor(object_masks, dtype=torch.float32)[:, None]
    coverage = F.adaptive_avg_pool2d(masks, latent_size)
    return 1.0 + object_weight * coverage


def diffusion_loss(
    prediction: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler,
    weights: torch.Tensor,
    min_snr_gamma: float | None,
) -> torch.Tensor:
    """Weighted epsilon-prediction loss.

    mean_b [ min(SNR_t, gamma) / SNR_t * mean_(c,h,w) weights * (eps_theta - eps)^2 ], with
    SNR_t = alpha_bar_t / (1 - alpha_bar_t) (Min-SNR-gamma weighting, Hang et al. 2023, for epsilon
    targets; gamma None gives weight 1 at every t).

    Args:
        prediction: eps_theta, (B, C, h, w).
        noise: eps, (B, C, h, w).
        timesteps: t, (B,).
        scheduler: the training DDPMScheduler (its alphas_cumprod).
        weights: per-pixel weights, broadcastable to (B, C, h, w).
        min_snr_gamma: gamma, or None.
    """
    per_sample = (weights * (prediction - noise).pow(2)).mean(dim=(1, 2, 3))
    if min_snr_gamma is not None:
        alpha_bar = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
        snr = alpha_bar / (1.0 - alpha_bar)
        per_sample = per_sample * snr.clamp(max=min_snr_gamma) / snr
    return per_sample.mean()


def train_unet(config: TrainConfig, resume: bool = False) -> Path:
    """Train UNet + CLIP text encoder on cached latents (epsilon, caption dropout); save the SD folder.

    Args:
        config: the training job.
        resume: start from the UNet and text encoder already saved in OUTPUT/shapes-sd (continue training
            with a fresh step/time budget) instead of from random weights.

    Returns:
        The saved diffusers folder, OUTPUT/shapes-sd.
    """
    rng = seed_everything(config.seed + UNET_SEED_OFFSET)
    device = training_device()
    # Resuming keeps the VAE whose latents the saved UNet learned; a fresh run takes the vae stage's.
    vae_folder = Path(config.output) / SD_FOLDER_NAME / "vae" if resume else cached_vae_folder(config)
    vae = load_in_memory(AutoencoderKL, vae_folder).to(device).eval()
    data = training_scenes(config)
    # The first `unet.scenes` training scenes: encoding them all would take much of the UNet's budget.
    data = data.head(config.unet.scenes)
    latent_mean, latent_std = cache_latents(config, vae, data.images)
    loss_weights = object_loss_weights(
        data.object_masks, latent_mean.shape[-1], config.unet.object_loss_weight
    )
    scaling = float(vae.config.scaling_factor)
    # The UNet denoises the latents of the VAE it learns on, whatever vae.latent_channels says now.
    arch = dataclasses.replace(sd_architecture(config), latent_channels=int(vae.config.latent_channels))
    tokenizer = write_clip_tokenizer(Path(config.cache_dir) / "tokenizer", arch.max_length)
    text_encoder = build_text_encoder(arch, vocab_size=len(tokenizer))
    unet = build_unet(arch)
    log = MetricsLog(config.output)
    previous = Progress()
    if resume:
        unet, text_encoder, previous = _resume_from(config, unet, log)
    text_encoder, unet = text_encoder.to(device), unet.to(device)
    tokens = tokenizer(
        data.captions, padding="max_length", max_length=arch.max_length, return_tensors="pt"
    ).input_ids
    empty = tokenizer([""], padding="max_length", max_length=arch.max_length, return_tensors="pt").input_ids
    scheduler = ddpm_scheduler()
    parameters = list(unet.parameters()) + (
        list(text_encoder.parameters()) if config.unet.train_text_encoder else []
    )
    text_encoder.requires_grad_(config.unet.train_text_encoder)
    optimizer = torch.optim.AdamW(parameters, lr=config.unet.lr, weight_decay=1e-2)
    ema = {name: module.state_dict() for name, module in (("unet", unet), ("text", text_encoder))}
    ema = {name: {key: value.detach().clone() for key, value in state.items()} for name, state in ema.items()}

    def loss_step() -> torch.Tensor:
        index = torch.as_tensor(rng.choice(len(latent_mean), config.unet.batch))
        latents = (latent_mean[index] + latent_std[index] * torch.randn_like(latent_std[index])) * scaling
        latents = latents.to(device)
        batch_tokens = tokens[index].clone()
        dropped = torch.as_tensor(rng.random(len(index)) < config.unet.caption_dropout)
        batch_tokens[dropped] = empty
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(index),)).to(device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, text_encoder(batch_tokens.to(device))[0]).sample
        return diffusion_loss(
            prediction, noise, timesteps, scheduler, loss_weights[index].to(device), config.unet.min_snr_gamma
        )

    def after_step(step: int) -> None:
        _update_ema(ema, unet, text_encoder, min(config.unet.ema_decay, (1 + step) / (10 + step)))

    budget = Budget(config.unet.steps, config.unet.max_minutes)
    unet.train()
    text_encoder.train(config.unet.train_text_encoder)
    final_loss = optimize(
        loss_step,
        optimizer,
        budget,
        stage="unet",
        peak_lr=config.unet.lr,
        warmup_steps=100,
        max_grad_norm=1.0,
        after_step=after_step,
        log_every=25,
    )
    unet.load_state_dict(ema["unet"])
    text_encoder.load_state_dict(ema["text"])
    unet, text_encoder, vae = unet.cpu(), text_encoder.cpu(), vae.cpu()
    # Re-read the VAE: the vae-decoder stage may have improved its decoder meanwhile (same encoder).
    vae = _reload_vae_same_encoder(vae_folder, vae)
    folder = save_sd_folder(
        Path(config.output) / SD_FOLDER_NAME, unet.eval(), vae, text_encoder.eval(), tokenizer, arch.scheduler
    )
    total = previous.after(budget)
    log.record(
        "unet",
        {
            "steps": budget.step,
            "wall_s": round(budget.elapsed),
            "batch": config.unet.batch,
            "peak_lr": config.unet.lr,
            "final_loss": round(final_loss, 5),
            "unet_parameters": sum(p.numel() for p in unet.parameters()),
            "text_encoder_parameters": sum(p.numel() for p in text_encoder.parameters()),
            "train_text_encoder": config.unet.train_text_encoder,
            "resumed_after_steps": previous.steps,
            "total_steps": total.steps,
            "total_wall_s": total.wall_s,
        },
    )
    return folder


def _resume_from(
    config: TrainConfig, unet: UNet2DConditionModel, log: MetricsLog
) -> tuple[UNet2DConditionModel, CLIPTextModel, Progress]:
    """The saved UNet and text encoder (its channels and blocks must match the job's `unet`), and how long
    they were trained for so far."""
    folder = Path(config.output) / SD_FOLDER_NAME
    if not (folder / "unet").is_dir():
        raise FileNotFoundError(f"--resume: no saved model in {folder}; train without --resume first")
    saved_unet = load_in_memory(UNet2DConditionModel, folder / "unet")
    saved_text = load_in_memory(CLIPTextModel, folder / "text_encoder")
    if tuple(saved_unet.config.block_out_channels) != tuple(unet.config.block_out_channels):
        raise ConfigError(
            f"--resume: saved UNet has channels {list(saved_unet.config.block_out_channels)}, the job asks "
            f"for {list(unet.config.block_out_channels)}; use the same unet.channels or train afresh"
        )
    if tuple(saved_unet.config.down_block_types) != tuple(unet.config.down_block_types):
        raise ConfigError(
            f"--resume: saved UNet has blocks {list(saved_unet.config.down_block_types)}, the job asks for "
            f"{list(unet.config.down_block_types)}; use the unet.plain_levels it was trained with or train afresh"
        )
    return saved_unet, saved_text, log.progress("unet")


@torch.no_grad()
def _update_ema(ema: dict, unet, text_encoder, decay: float) -> None:
    for name, module in (("unet", unet), ("text", text_encoder)):
        for key, value in module.state_dict().items():
            if value.dtype.is_floating_point:
                ema[name][key].mul_(decay).add_(value.detach(), alpha=1 - decay)
            else:
                ema[name][key].copy_(value)


def _reload_vae_same_encoder(vae_folder: Path, vae: AutoencoderKL) -> AutoencoderKL:
    """The VAE in `vae_folder` as it is now, checked to have the encoder the latents came from."""
    current = load_in_memory(AutoencoderKL, vae_folder).eval()
    for part in ("encoder", "quant_conv"):
        old, new = getattr(vae, part).state_dict(), getattr(current, part).state_dict()
        if any(not torch.equal(old[key].cpu(), new[key]) for key in old):
            raise RuntimeError(f"the VAE's {part} changed during UNet training; re-run the unet stage")
    if current.config.scaling_factor != vae.config.scaling_factor:
        raise RuntimeError("the VAE's scaling_factor changed during UNet training; re-run the unet stage")
    return current
