"""Guided noise prediction and DDIM sampling on a recording stand-in UNet: classifier-free guidance
written out from separate branch calls, which branches each guidance scale runs, the value input's
concatenation, per-step embeddings, and the first step whose latents stop being finite."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler

from pipeline.diffusion.attention import ControlledAttnProcessor
from pipeline.diffusion.ddim import DDIMSchedule
from pipeline.diffusion.sampling import predict_noise, sample


class _RecordingUNet(torch.nn.Module):
    """eps = 0.1 z + mean(embeddings) + t / 1000, row by row; records every call and installed processor."""

    def __init__(self, controller=None) -> None:
        super().__init__()
        self.calls, self.processors, self.controller = [], [], controller

    def forward(self, latents, timestep, encoder_hidden_states):
        step = None if self.controller is None else self.controller.step
        self.calls.append(
            SimpleNamespace(rows=latents.shape[0], timestep=timestep, states=encoder_hidden_states, step=step)
        )
        shift = encoder_hidden_states.mean(dim=(1, 2))[:, None, None, None]
        return SimpleNamespace(sample=0.1 * latents + shift + timestep / 1000)

    @property
    def attn_processors(self):
        return {}

    def set_attn_processor(self, processor):
        self.processors.append(processor)


def _branch(unet, latents, timestep, embeddings):
    return unet(latents, timestep, embeddings).sample


def _inputs(rows: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(rows, 4, 8, 8, generator=generator)
    cond, uncond, value = (torch.randn(rows, 5, 6, generator=generator) for _ in range(3))
    return latents, cond, uncond, value


def test_guided_noise_is_the_unconditional_branch_plus_w_times_the_difference_in_one_call():
    unet = _RecordingUNet()
    latents, cond, uncond, _ = _inputs(rows=3)  # an odd count: the two branches are split by rows
    guided = predict_noise(unet, latents, 500, cond, uncond, 7.5)
    assert [call.rows for call in unet.calls] == [6]
    eps_uncond, eps_cond = _branch(unet, latents, 500, uncond), _branch(unet, latents, 500, cond)
    assert torch.allclose(guided, eps_uncond + 7.5 * (eps_cond - eps_uncond), atol=1e-5)


@pytest.mark.parametrize("guidance", [0.0, 1.0])
def test_w_0_and_1_run_one_branch_unless_both_are_forced(guidance):
    # Legend: w = 1 needs only the conditional branch, w = 0 only the unconditional one.
    latents, cond, uncond, _ = _inputs()
    only = cond if guidance == 1.0 else uncond
    unet = _RecordingUNet()
    noise = predict_noise(unet, latents, 300, cond, uncond, guidance)
    assert [call.rows for call in unet.calls] == [3] and torch.equal(unet.calls[0].states, only)
    assert torch.equal(noise, _branch(unet, latents, 300, only))
    forced = _RecordingUNet()
    both = predict_noise(forced, latents, 300, cond, uncond, guidance, force_both_branches=True)
    assert [call.rows for call in forced.calls] == [6] and torch.allclose(both, noise, atol=1e-5)


def test_w_1_needs_no_unconditional_embeddings_and_other_scales_say_they_do():
    latents, cond, _, _ = _inputs()
    unet = _RecordingUNet()
    assert torch.equal(predict_noise(unet, latents, 300, cond, None, 1.0), _branch(unet, latents, 300, cond))
    with pytest.raises(ValueError, match=r"guidance_scale=7\.5 needs unconditional embeddings"):
        predict_noise(unet, latents, 300, cond, None, 7.5)


def test_a_value_input_follows_the_key_input_of_each_branch():
    latents, cond, uncond, value = _inputs()
    unet = _RecordingUNet()
    predict_noise(unet, latents, 300, cond, uncond, 7.5, value_embeddings=value)
    expected = torch.cat([torch.cat([uncond, uncond], dim=1), torch.cat([cond, value], dim=1)])
    assert torch.equal(unet.calls[0].states, expected)
    predict_noise(unet, latents, 300, cond, None, 1.0, value_embeddings=value)
    assert torch.equal(unet.calls[1].states, torch.cat([cond, value], dim=1))


def _schedule(steps: int = 5) -> DDIMSchedule:
    return DDIMSchedule.from_scheduler(DDIMScheduler(), steps)


def _per_step_embeddings(steps: int, rows: int, seed: int) -> torch.Tensor:
    return torch.randn(steps, rows, 5, 6, generator=torch.Generator().manual_seed(seed))


def test_sampling_is_the_ddim_loop_with_each_steps_own_embeddings():
    schedule, unet = _schedule(), _RecordingUNet()
    start = _inputs()[0]
    cond, uncond = _per_step_embeddings(5, 3, 1), _per_step_embeddings(5, 3, 2)
    seen = []

    def after_step(step_index, latents):
        seen.append(step_index)
        return latents * 0.9

    result, first_nonfinite = sample(unet, schedule, start, cond, uncond, 3.0, after_step=after_step)
    timesteps = schedule.timesteps.tolist()
    assert [call.timestep for call in unet.calls] == timesteps and seen == list(range(5))
    for step_index, call in enumerate(unet.calls):
        assert torch.equal(call.states, torch.cat([uncond[step_index], cond[step_index]]))
    # The same loop written out: guidance from separate branch calls, the DDIM step, the callback.
    latents = start
    for step_index, timestep in enumerate(timesteps):
        eps_uncond = _branch(unet, latents, timestep, uncond[step_index])
        eps_cond = _branch(unet, latents, timestep, cond[step_index])
        latents = 0.9 * schedule.step(eps_uncond + 3.0 * (eps_cond - eps_uncond), timestep, latents)
    assert torch.allclose(result, latents, atol=1e-5)
    assert torch.equal(first_nonfinite, torch.full((3,), -1))


def test_the_first_nonfinite_step_is_recorded_per_row_and_kept():
    schedule, unet = _schedule(), _RecordingUNet()
    cond, uncond = _per_step_embeddings(5, 4, 3), _per_step_embeddings(5, 4, 4)
    poison = {0: (1, float("nan")), 2: (2, float("inf")), 4: (3, float("-inf"))}  # step -> (row, value)
    finite_after = []

    def after_step(step_index, latents):
        if step_index in poison:
            row, value = poison[step_index]
            latents = latents.clone()
            latents[row, 0, 0, 0] = value
        finite_after.append(torch.isfinite(latents).flatten(1).all(dim=1))
        return latents

    _, first_nonfinite = sample(unet, schedule, _inputs(rows=4)[0], cond, uncond, 3.0, after_step=after_step)
    # Independently: per row, the first step after which its latents held a non-finite value, -1 if none.
    expected = [
        next((step for step, finite in enumerate(finite_after) if not finite[row]), -1) for row in range(4)
    ]
    assert expected == [-1, 0, 2, 4]
    assert first_nonfinite.tolist() == expected and first_nonfinite.dtype == torch.long


class _Controller:
    """Stands in for an AttentionController: the sampler only sets its `step`."""

    step = -1


def test_a_controller_sees_each_step_and_both_branches_at_w_1():
    controller = _Controller()
    schedule, unet = _schedule(), _RecordingUNet(controller)
    cond, uncond = _per_step_embeddings(5, 3, 5), _per_step_embeddings(5, 3, 6)
    sample(unet, schedule, _inputs()[0], cond, uncond, 1.0, controller=controller)
    assert [call.step for call in unet.calls] == list(range(5))
    assert all(call.rows == 6 for call in unet.calls)  # attention control needs both branches
    (processor,) = unet.processors[:1]
    assert isinstance(processor, ControlledAttnProcessor) and processor.controller is controller
    assert not processor.value_input


def test_processors_are_installed_for_a_value_input_and_not_without_one():
    schedule, cond, uncond = _schedule(), _per_step_embeddings(5, 3, 7), _per_step_embeddings(5, 3, 8)
    plain = _RecordingUNet()
    sample(plain, schedule, _inputs()[0], cond, uncond, 1.0)
    assert plain.processors == [] and all(call.rows == 3 for call in plain.calls)
    valued = _RecordingUNet()
    value = _per_step_embeddings(5, 3, 9)
    sample(valued, schedule, _inputs()[0], cond, uncond, 1.0, value_embeddings=value)
    assert valued.processors[0].value_input and valued.processors[0].controller is None
    for step_index, call in enumerate(valued.calls):
        assert torch.equal(call.states, torch.cat([cond[step_index], value[step_index]], dim=1))
