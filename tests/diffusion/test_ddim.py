import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

from pipeline.diffusion.ddim import DDIMSchedule
from pipeline.diffusion.sampling import sample
from pipeline.diffusion.tokens import encode_prompts
from pipeline.diffusion.trajectory import per_step
from pipeline.methods.ddim_inversion import ddim_trajectory
from pipeline.models.vae import encode_images


def test_sd_grid_and_partial_strength(tiny_sd):
    schedule = DDIMSchedule.from_scheduler(tiny_sd.scheduler, 50)
    assert schedule.timesteps[0] == 981 and schedule.timesteps[-1] == 1 and schedule.stride == 20
    partial = DDIMSchedule.from_scheduler(tiny_sd.scheduler, 50, strength=0.5)
    assert torch.equal(partial.timesteps, schedule.timesteps[-25:])
    with pytest.raises(ValueError, match="strength"):
        DDIMSchedule.from_scheduler(tiny_sd.scheduler, 50, strength=0.0)


def test_step_matches_diffusers_ddim_scheduler(tiny_sd):
    """Our eq. 4 step against diffusers' own DDIM step (eta = 0), a second implementation."""
    schedule = DDIMSchedule.from_scheduler(tiny_sd.scheduler, 10)
    reference = DDIMScheduler.from_config(tiny_sd.scheduler.config)
    reference.set_timesteps(10)
    generator = torch.Generator().manual_seed(0)
    latents, noise = (
        torch.randn(2, 4, 8, 8, generator=generator),
        torch.randn(2, 4, 8, 8, generator=generator),
    )
    for timestep in schedule.timesteps.tolist():
        expected = reference.step(noise, timestep, latents, eta=0.0).prev_sample
        torch.testing.assert_close(schedule.step(noise, timestep, latents), expected, rtol=1e-5, atol=1e-5)


def test_inverse_step_undoes_step_for_the_same_noise(tiny_sd):
    schedule = DDIMSchedule.from_scheduler(tiny_sd.scheduler, 10)
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for timestep in schedule.timesteps.tolist():
        back = schedule.inverse_step(noise, timestep, schedule.step(noise, timestep, latents))
        torch.testing.assert_close(back, latents, rtol=1e-5, atol=1e-5)


def test_inversion_grid_matches_diffusers_inverse_scheduler(tiny_sd):
    """Inversion visits the sampling grid reversed, with the same alpha pairs as diffusers' inverse scheduler.

    DDIMInverseScheduler has had an off-by-one (its grid shifted one slot against DDIMScheduler's when
    steps_offset is set); comparing move by move catches a shift in either implementation.
    """
    schedule = DDIMSchedule.from_scheduler(tiny_sd.scheduler, 10)
    inverse = DDIMInverseScheduler.from_config(tiny_sd.scheduler.config)
    inverse.set_timesteps(10)
    assert inverse.timesteps.tolist() == list(reversed(schedule.timesteps.tolist()))
    latents, noise = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    for timestep in inverse.timesteps.tolist():
        expected = inverse.step(noise, timestep, latents).prev_sample
        torch.testing.assert_close(
            schedule.inverse_step(noise, timestep, latents), expected, rtol=1e-5, atol=1e-5
        )


def _embeddings(model, prompts):
    return encode_prompts(model.tokenizer, model.text_encoder, prompts), encode_prompts(
        model.tokenizer, model.text_encoder, [""] * len(prompts)
    )


def test_invert_then_sample_at_w1_returns_to_z0(tiny_sd, images, prompts):
    schedule = DDIMSchedule.from_scheduler(tiny_sd.scheduler, 20)
    cond, uncond = _embeddings(tiny_sd, prompts[:2])
    clean = encode_images(tiny_sd, images[:2])
    trajectory = ddim_trajectory(tiny_sd.unet, schedule, clean, cond, uncond, 1.0, [None, None])
    steps = schedule.num_steps
    back, _ = sample(
        tiny_sd.unet, schedule, trajectory[-1], per_step(cond, steps), per_step(uncond, steps), 1.0
    )
    relative = (back - clean).norm() / clean.norm()
    assert relative < 2e-2, relative


def test_sample_then_invert_recovers_xT(tiny_sd, prompts):
    schedule = DDIMSchedule.from_scheduler(tiny_sd.scheduler, 20)
    cond, uncond = _embeddings(tiny_sd, prompts[:2])
    noise_end = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    steps = schedule.num_steps
    clean, _ = sample(tiny_sd.unet, schedule, noise_end, per_step(cond, steps), per_step(uncond, steps), 1.0)
    trajectory = ddim_trajectory(tiny_sd.unet, schedule, clean, cond, uncond, 1.0, [None, None])
    relative = (trajectory[-1] - noise_end).norm() / noise_end.norm()
    assert relative < 2e-2, relative


def test_grid_bounds_one_step_and_the_clean_end_of_an_alpha_one_scheduler(tiny_sd):
    """One step is a valid grid; a partial grid keeps at least one step (round(10 * 0.1) = 1 and
    round(4 * 0.1) = 0 both keep exactly one); out-of-range settings are refused naming the setting; and
    alpha_bar(0) is the grid's first alpha, not the clean end (they differ when set_alpha_to_one)."""
    one = DDIMSchedule.from_scheduler(tiny_sd.scheduler, 1)
    assert one.num_steps == 1 and one.stride == tiny_sd.scheduler.config.num_train_timesteps
    for num_steps in (10, 4):
        assert DDIMSchedule.from_scheduler(tiny_sd.scheduler, num_steps, strength=0.1).num_steps == 1
    with pytest.raises(ValueError, match="num_steps must be >= 1, got 0"):
        DDIMSchedule.from_scheduler(tiny_sd.scheduler, 0)
    with pytest.raises(ValueError, match="strength must be in"):
        DDIMSchedule.from_scheduler(tiny_sd.scheduler, 10, strength=1.5)
    scheduler = DDIMScheduler.from_config(tiny_sd.scheduler.config, set_alpha_to_one=True)
    schedule = DDIMSchedule.from_scheduler(scheduler, 10)
    assert schedule.final_alpha_cumprod == 1.0
    assert schedule.alpha_bar(0) == float(scheduler.alphas_cumprod[0]) < 1.0
    assert schedule.alpha_bar(-1) == 1.0
