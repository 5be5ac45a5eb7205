"""What every method shares: the pivotal DDIM inversion at the method's w, and a NaN raised there
named as DDIM inversion's in the image's error (not lost, not blamed on a later loop)."""

import pytest
import torch

from pipeline.diffusion.ddim import DDIMSchedule
from pipeline.diffusion.tokens import encode_prompts
from pipeline.engine import InversionConfig, invert
from pipeline.methods import PromptTuningParams
from pipeline.methods.null_text import learning_rate_at, stop_threshold_at
from pipeline.methods.prompt_tuning import PromptTuningEditHook
from pipeline.models.vae import encode_images

STEPS = 3
PIVOTAL = ["ddim", "direct", "negative_prompt", "null_text", "prompt_tuning"]


@pytest.mark.parametrize("method", PIVOTAL)
def test_a_nan_in_the_pivotal_inversion_is_named_as_ddim_inversion(tiny_sd, images, prompts, method):
    calls = {"n": 0}

    def poison(module, args, kwargs, output):
        calls["n"] += 1
        if calls["n"] == 2:  # the second inversion step
            output.sample[:] = float("nan")
        return output

    handle = tiny_sd.unet.register_forward_hook(poison, with_kwargs=True)
    try:
        config = InversionConfig.of(method, num_steps=STEPS, guidance_scale=7.5, strength=1.0)
        result = invert(tiny_sd, images[:1], prompts[:1], config)
    finally:
        handle.remove()
    error = result.errors[0]
    assert error is not None and "non-finite latents in DDIM inversion at step" in error, error


@pytest.mark.parametrize("method", ["ddim", "direct", "null_text"])
def test_inversion_guidance_zero_inverts_with_the_unconditional_branch_alone(
    tiny_sd, images, prompts, method
):
    config = InversionConfig.of(method, num_steps=STEPS, guidance_scale=7.5, inversion_guidance=0.0)
    result = invert(tiny_sd, images[:1], prompts[:1], config)
    schedule = DDIMSchedule.from_scheduler(tiny_sd.scheduler, STEPS)
    uncond = encode_prompts(tiny_sd.tokenizer, tiny_sd.text_encoder, [""])
    latent = encode_images(tiny_sd, images[:1])
    with torch.no_grad():
        for timestep in reversed(schedule.timesteps.tolist()):
            noise = tiny_sd.unet(latent, timestep, encoder_hidden_states=uncond).sample
            latent = schedule.inverse_step(noise, timestep, latent)
    torch.testing.assert_close(result.latents.trajectory[-1], latent, atol=1e-5, rtol=0)


def test_null_text_schedules_are_the_reference_notebooks():
    """lr = 1e-2 (1 - i / 100) and stop once loss < epsilon + i * 2e-5, at the notebook's 50 steps."""
    assert learning_rate_at(1e-2, 0) == 1e-2
    assert learning_rate_at(1e-2, 50) == pytest.approx(5e-3, rel=1e-12)
    assert learning_rate_at(1e-2, 49) == pytest.approx(1e-2 * 0.51, rel=1e-12)
    assert stop_threshold_at(1e-5, 0) == 1e-5
    assert stop_threshold_at(1e-5, 49) == pytest.approx(1e-5 + 49 * 2e-5, rel=1e-12)


class _Request:
    def __init__(self, eta: float, latent_interpolation: bool):
        self.eta, self.latent_interpolation = eta, latent_interpolation


def test_prompt_tuning_latent_interpolation_is_eq_10():
    """z_edit <- eta z_edit + (1 - eta) z*_t after each step, only when asked; otherwise untouched."""
    hook = PromptTuningEditHook()
    latent, pivot = torch.randn(4, 8, 8), torch.randn(4, 8, 8)
    for eta in (0.25, 0.7):
        steered = hook.steer(latent, pivot, _Request(eta, latent_interpolation=True))
        torch.testing.assert_close(steered, eta * latent + (1 - eta) * pivot)
        assert torch.equal(hook.steer(latent, pivot, _Request(eta, latent_interpolation=False)), latent)
    assert PromptTuningParams().optimizer == "sgd"
