"""The shapes world's UNet stage: the diffusion loss and its object weighting, the latent cache's key, and
a UNet built for the latent channels of the VAE it learns on."""

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError
from pipeline.models.build import SDArchitecture, build_vae
from pipeline.models.loading import load_diffusion_model
from pipeline.training import cli, world_unet
from pipeline.training.world_config import DEFAULT_CONFIG, load_train_config
from pipeline.training.world_unet import ddpm_scheduler, diffusion_loss, object_loss_weights
from pipeline.training.world_vae import cached_vae_folder


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


def _tiny_vae(latent_channels: int = 4):
    torch.manual_seed(0)
    arch = SDArchitecture(image_size=64, latent_channels=latent_channels, vae_channels=(8, 16, 16))
    return build_vae(arch).eval()


def test_the_latent_cache_key_follows_the_encoder_and_the_scaling_not_the_decoder():
    vae = _tiny_vae()
    key = world_unet.encoder_digest(vae)
    assert world_unet.encoder_digest(_tiny_vae()) == key  # the same weights, the same key
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(1.0)
    assert world_unet.encoder_digest(vae) == key
    with torch.no_grad():
        vae.quant_conv.bias.add_(1e-3)
    moved_quant = world_unet.encoder_digest(vae)
    assert moved_quant != key
    with torch.no_grad():
        vae.encoder.conv_in.weight[0, 0, 0, 0] += 1e-3
    moved_encoder = world_unet.encoder_digest(vae)
    assert moved_encoder not in (key, moved_quant)
    vae.register_to_config(scaling_factor=0.5)
    assert world_unet.encoder_digest(vae) not in (key, moved_quant, moved_encoder)


_TINY_UNET_JOB = ["output={tmp}/out", "cache_dir={tmp}/cache", "data.train_scenes=8",
                 "data.heldout_scenes=4", "unet.channels=[16,32]", "unet.text_width=16", "unet.text_layers=1",
                 "unet.text_heads=2", "unet.text_intermediate=32", "unet.steps=2", "unet.batch=2",
                 "unet.scenes=8"]  # fmt: skip


def test_the_unet_is_built_for_the_latent_channels_of_its_vae_and_loads_as_users_load_it(tmp_path):
    overrides = [item.format(tmp=tmp_path) for item in _TINY_UNET_JOB]
    # The job still says vae.latent_channels: 4; the VAE in the cache has 8 and decides.
    config = load_train_config(DEFAULT_CONFIG, overrides)
    _tiny_vae(latent_channels=8).save_pretrained(cached_vae_folder(config), safe_serialization=True)
    folder = world_unet.train_unet(config)
    model = load_diffusion_model(folder)
    assert (model.unet.config.in_channels, model.unet.config.out_channels) == (8, 8)
    assert model.latent_channels == 8
    latents = model.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mode()
    tokens = model.tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        prediction = model.unet(latents, 10, model.text_encoder(tokens)[0]).sample
    assert prediction.shape == latents.shape == (1, 8, 16, 16)
    cached = sorted(path.name for path in (tmp_path / "cache").glob("latents_*.pt"))
    assert cached == [f"latents_{config.seed}_8_{world_unet.encoder_digest(model.vae)}.pt"]


def test_resuming_the_unet_stage_with_other_channels_exits_in_one_line_naming_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "set_num_threads", lambda threads: None)  # the command sets the process's
    overrides = [item.format(tmp=tmp_path) for item in _TINY_UNET_JOB]
    _tiny_vae().save_pretrained(cached_vae_folder(load_train_config(DEFAULT_CONFIG, overrides)))
    arguments = ["unet", "--config", str(DEFAULT_CONFIG), "--threads", "1"]
    arguments += [item for override in overrides for item in ("--set", override)]
    cli.main(arguments)
    with pytest.raises(
        SystemExit,
        match=r"^error: unet: --resume: saved UNet has channels \[16, 32\], the job asks for \[16, 24\]",
    ):
        cli.main([*arguments, "--resume", "--set", "unet.channels=[16,24]"])


def test_the_unet_stage_builds_plain_top_levels_and_resumes_only_with_the_same_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "set_num_threads", lambda threads: None)  # the command sets the process's
    overrides = [item.format(tmp=tmp_path) for item in _TINY_UNET_JOB] + ["unet.channels=[16,16,32]"]
    _tiny_vae().save_pretrained(cached_vae_folder(load_train_config(DEFAULT_CONFIG, overrides)))
    arguments = ["unet", "--config", str(DEFAULT_CONFIG), "--threads", "1"]
    arguments += [item for override in overrides for item in ("--set", override)]
    cli.main([*arguments, "--set", "unet.plain_levels=1"])
    unet = load_diffusion_model(tmp_path / "out" / "shapes-sd").unet
    assert tuple(unet.config.down_block_types) == ("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    assert tuple(unet.config.up_block_types) == ("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    with pytest.raises(
        SystemExit,
        match=r"^error: unet: --resume: saved UNet has blocks \['DownBlock2D', 'CrossAttnDownBlock2D', "
        r"'DownBlock2D'\], the job asks for \['CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'\]; "
        r"use the unet.plain_levels it was trained with or train afresh$",
    ):
        cli.main([*arguments, "--resume"])


@pytest.mark.parametrize("plain_levels", [-1, 2])
def test_plain_levels_beyond_the_unets_levels_are_a_config_error_naming_the_key(plain_levels):
    with pytest.raises(
        ConfigError, match=rf"unet.plain_levels must be an integer from 0 to 1 .*got {plain_levels}$"
    ):
        load_train_config(DEFAULT_CONFIG, [f"unet.plain_levels={plain_levels}"])
