import torch

from pipeline.engine import InversionConfig, invert


def test_any_guidance_retraces_the_w1_ddim_path(tiny_sd, images, prompts):
    """uncond := c makes eps_tilde = eps(c) for every w, so w=7.5 reconstructs like DDIM at w=1."""
    negative = invert(
        tiny_sd, images[:2], prompts[:2], InversionConfig.of(method="negative_prompt", num_steps=5)
    )
    ddim_w1 = invert(
        tiny_sd, images[:2], prompts[:2], InversionConfig.of(method="ddim", num_steps=5, guidance_scale=1.0)
    )
    torch.testing.assert_close(
        negative.latents.reconstruction, ddim_w1.latents.reconstruction, atol=1e-5, rtol=1e-4
    )
    assert torch.equal(negative.latents.uncond_embeddings, negative.latents.cond_embeddings)
