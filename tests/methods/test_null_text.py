from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.diffusion.ddim import DDIMSchedule
from pipeline.diffusion.sampling import predict_noise
from pipeline.diffusion.tokens import encode_prompts
from pipeline.engine import InversionConfig, encode_images, invert
from pipeline.methods.ddim_inversion import ddim_trajectory
from pipeline.methods.null_text import invert_null_text

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
    # An epsilon between the images' first losses stops some images at step 0 and not others.
    epsilon = float(first_losses.sort().values[1])
    settings = dict(guidance_scale=7.5, inner_steps=3, learning_rate=1e-2, early_stop_epsilon=epsilon)
    batched = invert_null_text(tiny_sd.unet, schedule, clean, cond, uncond, **settings)
    separate = [
        invert_null_text(
            tiny_sd.unet, schedule, clean[i : i + 1], cond[i : i + 1], uncond[i : i + 1], **settings
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
    ddim = invert(tiny_sd, images[:2], prompts[:2], InversionConfig(method="ddim", **settings))
    null_text = invert(
        tiny_sd, images[:2], prompts[:2], InversionConfig(method="null_text", inner_steps=10, **settings)
    )
    clean = ddim.latents.trajectory[0]
    ddim_error = (ddim.latents.reconstruction - clean).flatten(1).norm(dim=1)
    null_text_error = (null_text.latents.reconstruction - clean).flatten(1).norm(dim=1)
    assert (null_text_error <= ddim_error).all(), (null_text_error, ddim_error)
    # On a random-weight model the null embedding steers eps only weakly: about a 40% reduction.
    assert null_text_error.mean() < 0.75 * ddim_error.mean(), (null_text_error, ddim_error)


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
        config = InversionConfig(method=method, num_steps=20, guidance_scale=7.5, learning_rate=learning_rate)
        inversion = invert(model, images, captions, config)
        reconstruction, clean = inversion.latents.reconstruction, inversion.latents.trajectory[0]
        errors[name] = (reconstruction - clean).flatten(1).norm(dim=1)
    assert (errors["null_text_paper_lr"] <= errors["ddim"]).all(), errors
    assert (errors["null_text"] <= errors["ddim"]).all(), errors
    assert errors["ddim"].mean() >= 10 * errors["null_text"].mean(), errors
