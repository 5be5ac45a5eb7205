import pytest
import torch

from pipeline.diffusion.ddim import DDIMSchedule
from pipeline.diffusion.sampling import sample
from pipeline.diffusion.tokens import encode_prompts
from pipeline.diffusion.trajectory import InversionInputs, per_step
from pipeline.engine import AttentionControl, EditRequest, InversionConfig, edit, invert
from pipeline.methods import PromptTuningParams
from pipeline.methods.prompt_tuning import invert as invert_prompt_tuning
from pipeline.models.vae import encode_images

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


def _reference_prompt_tuning(unet, schedule, clean, cond, uncond, guidance, inner_steps, lr, optimizer_name):
    """Prompt Tuning Inversion's Algorithm 1 for one image, written out: unconditional DDIM inversion
    (w = 0), then from z_T per step N updates of c_t (plain gradient descent with step beta on the
    squared L2 norm, lines 7-9; or Adam on the MSE), c_t initialising c_{t-1}, z_{t-1} from the tuned c_t."""
    steps = schedule.num_steps
    latent, trajectory = clean, [clean]
    with torch.no_grad():
        for t in reversed(schedule.timesteps.tolist()):
            latent = schedule.inverse_step(unet(latent, t, encoder_hidden_states=uncond).sample, t, latent)
            trajectory.append(latent)
    latent, embedding, embeddings = trajectory[steps], cond.clone(), []
    for i, t in enumerate(schedule.timesteps.tolist()):
        embedding = embedding.detach().clone().requires_grad_(True)
        adam = torch.optim.Adam([embedding], lr=lr) if optimizer_name == "adam" else None
        with torch.no_grad():
            eps_uncond = unet(latent, t, encoder_hidden_states=uncond).sample
        for _ in range(inner_steps):
            eps_cond = unet(latent, t, encoder_hidden_states=embedding).sample
            landed = schedule.step(eps_uncond + guidance * (eps_cond - eps_uncond), t, latent)
            difference = landed - trajectory[steps - i - 1]
            if adam is None:
                (gradient,) = torch.autograd.grad(difference.pow(2).sum(), embedding)
                embedding = (embedding - lr * gradient).detach().requires_grad_(True)
            else:
                adam.zero_grad()
                difference.pow(2).mean().backward()
                adam.step()
        embeddings.append(embedding.detach())
        with torch.no_grad():
            eps_cond = unet(latent, t, encoder_hidden_states=embedding).sample
            latent = schedule.step(eps_uncond + guidance * (eps_cond - eps_uncond), t, latent)
    return torch.stack(trajectory), torch.stack(embeddings), latent


@pytest.mark.parametrize(("optimizer_name", "lr"), [("sgd", 0.1), ("adam", 0.05)])
def test_prompt_tuning_follows_algorithm_1_step_by_step(tiny_sd, images, prompts, optimizer_name, lr):
    schedule = DDIMSchedule.from_scheduler(tiny_sd.scheduler, 4)
    cond = encode_prompts(tiny_sd.tokenizer, tiny_sd.text_encoder, prompts[:1])
    uncond = encode_prompts(tiny_sd.tokenizer, tiny_sd.text_encoder, [""])
    clean = encode_images(tiny_sd, images[:1])
    trajectory, embeddings, reconstruction = _reference_prompt_tuning(
        tiny_sd.unet, schedule, clean, cond, uncond, 7.5, 2, lr, optimizer_name
    )
    params = PromptTuningParams(inner_steps=2, learning_rate=lr, optimizer=optimizer_name)
    result = invert_prompt_tuning(InversionInputs(tiny_sd.unet, schedule, clean, cond, uncond, 7.5), params)
    torch.testing.assert_close(result.trajectory, trajectory, atol=1e-5, rtol=0)
    torch.testing.assert_close(result.cond_embeddings, embeddings, atol=1e-4, rtol=0)
    torch.testing.assert_close(result.reconstruction, reconstruction, atol=1e-4, rtol=0)
    assert result.iterations.eq(2).all()
    # The tuning moved c_t: a test of the steps, not of an identity.
    assert (embeddings[-1] - cond).abs().max() > 1e-3


def test_a_nan_in_the_tuning_names_prompt_tunings_loop(tiny_sd, images, prompts):
    poisoned = []

    def poison(module, args, kwargs, output):
        if torch.is_grad_enabled() and not poisoned:  # the first call that is optimised
            poisoned.append(True)
            output.sample[:] = float("nan")
        return output

    handle = tiny_sd.unet.register_forward_hook(poison, with_kwargs=True)
    try:
        config = InversionConfig.of("prompt_tuning", num_steps=5, guidance_scale=7.5)
        result = invert(tiny_sd, images[:1], prompts[:1], config)
    finally:
        handle.remove()
    assert poisoned
    assert "non-finite loss in prompt tuning optimisation at step 0" in result.errors[0], result.errors
