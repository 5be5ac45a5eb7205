"""Plain DDIM sampling with classifier-free guidance, for judging the trained shapes-world model.

Pure tensor maths on a loaded `DiffusionModel` (no files). It follows diffusers' StableDiffusionPipeline:
eps = eps(z, t, "") + w * (eps(z, t, prompt) - eps(z, t, "")), DDIM with eta = 0, x = D(z / scaling_factor).
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler


@torch.no_grad()
def encode_prompts(model, prompts: list[str]) -> torch.Tensor:
    """Token embeddings (B, L, D) of `prompts`, padded to the tokenizer's model_max_length L."""
    tokens = model.tokenizer(
        prompts,
        padding="max_length",
        max_length=model.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    return model.text_encoder(tokens.input_ids.to(model.device))[0]


@torch.no_grad()
def sample_images(
    model, prompts: list[str], guidance_scale: float = 5.0, steps: int = 30, seed: int = 0
) -> torch.Tensor:
    """Generate one image per prompt.

    Args:
        model: a `pipeline.models.loading.DiffusionModel`.
        prompts: B captions.
        guidance_scale: CFG weight w (1 = no guidance).
        steps: DDIM steps.
        seed: seeds the initial noise z_T.

    Returns:
        uint8 images (B, H, W, 3).
    """
    if not prompts:
        raise ValueError("sample_images needs at least one prompt")
    scheduler = DDIMScheduler.from_config(model.scheduler.config)
    scheduler.set_timesteps(steps)
    conditional = encode_prompts(model, list(prompts))
    unconditional = encode_prompts(model, [""] * len(prompts))
    context = torch.cat([unconditional, conditional])
    generator = torch.Generator().manual_seed(seed)
    shape = (len(prompts), model.latent_channels, model.latent_size, model.latent_size)
    latents = (
        torch.randn(shape, generator=generator).to(model.device, model.dtype) * scheduler.init_noise_sigma
    )
    for timestep in scheduler.timesteps:
        eps_uncond, eps_cond = model.unet(torch.cat([latents, latents]), timestep, context).sample.chunk(2)
        eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        latents = scheduler.step(eps, timestep, latents).prev_sample
    images = model.vae.decode(latents / model.vae.config.scaling_factor).sample
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
