from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.diffusion.ddim import DDIMSchedule
from pipeline.diffusion.sampling import predict_noise
from pipeline.diffusion.tokens import encode_prompts
from pipeline.diffusion.trajectory import InversionInputs
from pipeline.engine import InversionConfig, invert
from pipeline.methods import NullTextParams
from pipeline.methods.ddim_inversion import ddim_trajectory
from pipeline.methods.null_text import invert as invert_null_text
from pipeline.models.vae import encode_images

STEPS = 5
SHAPES_SD = Path(__file__).resolve().parents[2] / "pipeline" / "world" / "assets" / "shapes-sd"
# A null-text lr at which the inner loop reaches every pivot of the shapes-world model.
SHAPES_WORLD_NULL_TEXT_LR = 5e-2


def _inputs(model, images, prompts):
    schedule = DDIMSchedule.from_scheduler(model.scheduler, STEPS)
    cond = encode_prompts(model.tokenizer, model.text_encoder, prompts)
    uncond = encode_prompts(model.tokenizer, model.text_encoder, [""] * len(prompts))
    return schedule, encode_images(model, images), cond, uncond


def test_batched_equals_separate_runs_with_different_early_stops(tiny_sd, images, prompts):
    schedule, clean, cond, uncond = _inputs(tiny_sd, images[:3], prompts[:3])
    trajectory = ddim_trajectory(tiny_sd.unet, schedule, clean, cond, uncond, 1.0, [None] * 3)
    timestep = int(schedule.timesteps[0])
    with torch.no_grad():
        noise = predict_noise(tiny_sd.unet, trajectory[-1], timestep, cond, uncond, 7.5)
    first_losses = (schedule.step(noise, timestep, trajectory[-1]) - trajectory[-2]).pow(2).flatten(1).mean(1)
    # An epsilon halfway between two images' first losses stops some images at step 0 and not others,
    # and no image's loss lies within rounding of it (batched and single-image passes differ in ulps).
    sorted_losses = first_losses.sort().values
    epsilon = float(sorted_losses[:2].mean())
    params = NullTextParams(inner_steps=3, learning_rate=1e-2, early_stop_epsilon=epsilon)
    batched = invert_null_text(InversionInputs(tiny_sd.unet, schedule, clean, cond, uncond, 7.5), params)
    separate = [
        invert_null_text(
            InversionInputs(
                tiny_sd.unet, schedule, clean[i : i + 1], cond[i : i + 1], uncond[i : i + 1], 7.5
            ),
            params,
        )
        for i in range(3)
    ]
    for image, alone in enumerate(separate):
        torch.testing.assert_close(
            batched.uncond_embeddings[:, image], alone.uncond_embeddings[:, 0], atol=1e-4, rtol=0
        )
        torch.testing.assert_close(batched.reconstruction[image], alone.reconstruction[0], atol=1e-4, rtol=0)
        assert torch.equal(batched.iterations[:, image], alone.iterations[:, 0])
    iterations = batched.iterations
    assert (iterations < 3).any() and (iterations == 3).any(), iterations
    assert not all(torch.equal(iterations[:, 0], iterations[:, i]) for i in (1, 2)), iterations


def test_reconstruction_never_worse_than_ddim_at_guidance_7_5(tiny_sd, images, prompts):
    settings = dict(num_steps=STEPS, guidance_scale=7.5)
    ddim = invert(tiny_sd, images[:2], prompts[:2], InversionConfig.of(method="ddim", **settings))
    null_text = invert(
        tiny_sd, images[:2], prompts[:2], InversionConfig.of(method="null_text", inner_steps=10, **settings)
    )
    clean = ddim.latents.trajectory[0]
    ddim_error = (ddim.latents.reconstruction - clean).flatten(1).norm(dim=1)
    null_text_error = (null_text.latents.reconstruction - clean).flatten(1).norm(dim=1)
    assert (null_text_error <= ddim_error).all(), (null_text_error, ddim_error)
    # On a random-weight model the null embedding steers eps only weakly: about a 40% reduction.
    assert null_text_error.mean() < 0.75 * ddim_error.mean(), (null_text_error, ddim_error)


def _reference_null_text(unet, schedule, trajectory, cond, uncond, guidance, inner_steps, base_lr, threshold):
    """Null-text optimisation for one image written out as the paper's algorithm and the reference
    notebook describe it: Adam with lr = base * (1 - i/100), early stop once loss < threshold(i)."""
    steps = schedule.num_steps
    latent, null = trajectory[steps], uncond.clone()
    embeddings, iterations, first_losses = [], [], []
    for i, t in enumerate(schedule.timesteps.tolist()):
        null = null.detach().clone().requires_grad_(True)
        optimizer = torch.optim.Adam([null], lr=base_lr * (1.0 - i / 100.0))
        with torch.no_grad():
            eps_cond = unet(latent, t, encoder_hidden_states=cond).sample
        count = 0
        for _ in range(inner_steps):
            eps_uncond = unet(latent, t, encoder_hidden_states=null).sample
            landed = schedule.step(eps_uncond + guidance * (eps_cond - eps_uncond), t, latent)
            loss = torch.nn.functional.mse_loss(landed, trajectory[steps - i - 1])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            count += 1
            if count == 1:
                first_losses.append(loss.item())
            if loss.item() < threshold(i):
                break
        embeddings.append(null.detach())
        iterations.append(count)
        with torch.no_grad():
            latent = schedule.step(predict_noise(unet, latent, t, cond, null, guidance), t, latent)
    return torch.stack(embeddings), iterations, first_losses, latent


def test_null_text_follows_the_reference_algorithm_step_by_step(tiny_sd, images, prompts):
    """Embeddings, iteration counts and reconstruction equal a plain re-implementation of the paper's
    loop, with an epsilon at which the early-stop ramp (epsilon + i * 2e-5) decides a step."""
    schedule, clean, cond, uncond = _inputs(tiny_sd, images[:1], prompts[:1])
    trajectory = ddim_trajectory(tiny_sd.unet, schedule, clean, cond, uncond, 1.0, [None])
    guidance, inner_steps, base_lr = 7.5, 3, 1e-2
    reference = _reference_null_text
    args = (tiny_sd.unet, schedule, trajectory, cond, uncond, guidance, inner_steps, base_lr)
    # Find an epsilon at which some step's first loss lies between the flat threshold and the ramped
    # one (epsilon <= loss < epsilon + i * 2e-5), so a flat threshold would change the iterations.
    _, _, losses, _ = reference(*args, threshold=lambda i: -1.0)
    found = None
    for step in range(STEPS - 1, 0, -1):
        epsilon = losses[step] - step * 1e-5
        for _ in range(3):  # the run at epsilon may stop earlier steps sooner: re-read its losses
            expected, iterations, run_losses, reconstruction = reference(
                *args, threshold=lambda i, epsilon=epsilon: epsilon + i * 2e-5
            )
            _, flat_iterations, _, _ = reference(*args, threshold=lambda i, epsilon=epsilon: epsilon)
            if iterations != flat_iterations:
                found = epsilon
                break
            epsilon = run_losses[step] - step * 1e-5
        if found is not None:
            break
    assert found is not None, losses  # the ramp decides at least one step at this epsilon

    params = NullTextParams(inner_steps=inner_steps, learning_rate=base_lr, early_stop_epsilon=epsilon)
    result = invert_null_text(InversionInputs(tiny_sd.unet, schedule, clean, cond, uncond, guidance), params)
    assert result.iterations[:, 0].tolist() == iterations
    torch.testing.assert_close(result.uncond_embeddings[:, 0], expected[:, 0], atol=1e-4, rtol=0)
    torch.testing.assert_close(result.reconstruction, reconstruction, atol=1e-4, rtol=0)


def test_a_nan_names_the_loop_it_came_from(tiny_sd, images, prompts):
    poisoned = {"calls": 0}

    def poison(module, args, kwargs, output):
        # the pivotal inversion makes STEPS calls; poison the first optimisation call after them
        poisoned["calls"] += 1
        if poisoned["calls"] == STEPS + 2:
            output.sample[:] = float("nan")
        return output

    handle = tiny_sd.unet.register_forward_hook(poison, with_kwargs=True)
    try:
        config = InversionConfig.of("null_text", num_steps=STEPS, inner_steps=2, guidance_scale=7.5)
        result = invert(tiny_sd, images[:1], prompts[:1], config)
    finally:
        handle.remove()
    assert "non-finite loss in null-text optimisation at step 0" in result.errors[0], result.errors


@pytest.mark.slow
def test_on_the_shapes_world_model_null_text_error_is_10x_below_ddim():
    """On a model whose text conditioning matters, guidance 7.5 breaks plain DDIM reconstruction.

    Null-text's inner loop is a budget of N Adam steps of size lr per timestep. The paper's lr (1e-2,
    tuned on SD) leaves this model's textured-background scenes short of their pivots (measured errors
    5.0 / 1.7 / 1.0 / 1.0 against DDIM's 15.9 / 15.2 / 5.9 / 11.1: below DDIM everywhere, 5.5x on
    average); with lr 5e-2 every scene reaches them. That lr reconstructs better but edits worse on this
    model (benchmarks/world_editing.py, rows "(lr 0.05)"), so jobs keep the paper's default.
    """
    from pipeline.models.loading import load_diffusion_model
    from pipeline.world import generator

    model = load_diffusion_model(SHAPES_SD)
    scenes = [
        generator.render(generator.sample_scene(4_000_000 + i, two_object_fraction=0.0)) for i in range(4)
    ]
    images = torch.from_numpy(np.stack([scene.image for scene in scenes]))
    captions = [scene.caption for scene in scenes]
    errors = {}
    for name, method, learning_rate in (
        ("ddim", "ddim", 1e-2),
        ("null_text_paper_lr", "null_text", 1e-2),
        ("null_text", "null_text", SHAPES_WORLD_NULL_TEXT_LR),
    ):
        rate = {} if method == "ddim" else {"learning_rate": learning_rate}
        config = InversionConfig.of(method=method, num_steps=20, guidance_scale=7.5, **rate)
        inversion = invert(model, images, captions, config)
        reconstruction, clean = inversion.latents.reconstruction, inversion.latents.trajectory[0]
        errors[name] = (reconstruction - clean).flatten(1).norm(dim=1)
    assert (errors["null_text_paper_lr"] <= errors["ddim"]).all(), errors
    assert (errors["null_text"] <= errors["ddim"]).all(), errors
    assert errors["ddim"].mean() >= 10 * errors["null_text"].mean(), errors
