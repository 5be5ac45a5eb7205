import pytest
import torch

from pipeline.diffusion.sampling import sample
from pipeline.diffusion.tokens import encode_prompts
from pipeline.diffusion.trajectory import per_step
from pipeline.engine import AttentionControl, EditRequest, InversionConfig, edit, invert

NO_CONTROL = AttentionControl(mode="none")


@pytest.fixture(scope="module")
def tuned(tiny_sd, images, prompts):
    config = InversionConfig.of(
        method="prompt_tuning", num_steps=5, guidance_scale=7.5, inner_steps=2, learning_rate=0.05
    )
    return invert(tiny_sd, images[:2], prompts[:2], config)


def test_eta_zero_reproduces_the_reconstruction(tiny_sd, tuned, prompts):
    result = edit(
        tiny_sd, tuned, [EditRequest(0, "a purple star on a black background", NO_CONTROL, eta=0.0)]
    )[0]
    torch.testing.assert_close(result.latents, tuned.latents.reconstruction[0], atol=1e-5, rtol=1e-4)


def test_eta_one_equals_ddim_edit_with_the_target_prompt(tiny_sd, tuned):
    target = "a purple star on a black background"
    result = edit(tiny_sd, tuned, [EditRequest(1, target, NO_CONTROL, eta=1.0)])[0]
    steps = tuned.schedule.num_steps
    c_star = encode_prompts(tiny_sd.tokenizer, tiny_sd.text_encoder, [target])
    null = encode_prompts(tiny_sd.tokenizer, tiny_sd.text_encoder, [""])
    ddim_edit, _ = sample(
        tiny_sd.unet,
        tuned.schedule,
        tuned.latents.trajectory[-1][1:2],
        per_step(c_star, steps),
        per_step(null, steps),
        7.5,
    )
    torch.testing.assert_close(result.latents, ddim_edit[0], atol=1e-5, rtol=1e-4)


def test_latent_interpolation_eta_zero_follows_the_inversion_pivots(tiny_sd, tuned):
    result = edit(
        tiny_sd, tuned, [EditRequest(0, "a red star", NO_CONTROL, eta=0.0, latent_interpolation=True)]
    )[0]
    torch.testing.assert_close(result.latents, tuned.latents.trajectory[0][0], atol=1e-6, rtol=0)


def test_tuning_improves_on_untuned_ddim_reconstruction(tiny_sd, images, prompts, tuned):
    untuned = invert(
        tiny_sd,
        images[:2],
        prompts[:2],
        InversionConfig.of(method="prompt_tuning", num_steps=5, inner_steps=0),
    )
    clean = tuned.latents.trajectory[0]
    tuned_error = (tuned.latents.reconstruction - clean).norm()
    untuned_error = (untuned.latents.reconstruction - clean).norm()
    assert tuned_error < untuned_error, (tuned_error, untuned_error)
