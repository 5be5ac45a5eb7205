"""The benchmark's DDIM + CFG sampler agrees with diffusers' StableDiffusionPipeline."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from pipeline.models.build import SDArchitecture, build_random_sd
from pipeline.models.loading import load_diffusion_model
from pipeline.world.sampling import sample_images


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    folder = build_random_sd(
        tmp_path_factory.mktemp("tiny_sd") / "model", SDArchitecture(image_size=32), seed=0
    )
    return load_diffusion_model(folder)


def test_matches_stable_diffusion_pipeline(tiny_model):
    prompts = ["a red star on a gray background", "a blue circle on a white background"]
    ours = sample_images(tiny_model, prompts, guidance_scale=4.0, steps=4, seed=3).numpy()
    pipeline = StableDiffusionPipeline(
        vae=tiny_model.vae,
        text_encoder=tiny_model.text_encoder,
        tokenizer=tiny_model.tokenizer,
        unet=tiny_model.unet,
        scheduler=DDIMScheduler.from_config(tiny_model.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    shape = (len(prompts), tiny_model.latent_channels, tiny_model.latent_size, tiny_model.latent_size)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    reference = pipeline(
        prompts,
        height=tiny_model.image_size,
        width=tiny_model.image_size,
        num_inference_steps=4,
        guidance_scale=4.0,
        latents=latents,
        output_type="np",
    ).images
    assert ours.shape == reference.shape
    assert np.abs(ours.astype(np.float64) / 255.0 - reference).max() < 2.0 / 255.0


def test_empty_prompt_list_is_rejected(tiny_model):
    with pytest.raises(ValueError, match="at least one prompt"):
        sample_images(tiny_model, [])
