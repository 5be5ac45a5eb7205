"""The step-wise embedding optimisation shared by null-text inversion and prompt tuning: its bookkeeping
(error slots, iteration counts, messages) and the early-stop rule of the reference code, with a
stand-in noise predictor whose output is a known function of its inputs."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from diffusers import DDIMScheduler

from pipeline.diffusion.ddim import DDIMSchedule
from pipeline.diffusion.optimization import _still_active, optimize_stepwise
from pipeline.models.build import SD_DDIM_DEFAULTS

STEPS, BATCH = 2, 2


class LinearUNet(torch.nn.Module):
    """eps = 0.1 z + mean(embedding): finite inputs give finite outputs, an infinite embedding does not."""

    def forward(self, latents, timestep, encoder_hidden_states):
        shift = encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return SimpleNamespace(sample=0.1 * latents + shift)


def _run(fixed: torch.Tensor, inner_steps: int, **options):
    schedule = DDIMSchedule.from_scheduler(DDIMScheduler(**SD_DDIM_DEFAULTS), STEPS)
    trajectory = torch.randn(STEPS + 1, BATCH, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    initial = torch.zeros(BATCH, 3, 5)
    result = optimize_stepwise(
        LinearUNet(),
        schedule,
        trajectory,
        fixed,
        initial,
        "uncond",
        7.5,
        inner_steps,
        lambda step: 1e-2,
        **options,
    )
    return result, schedule


def test_without_error_slots_every_image_gets_one_and_counts_are_integer_iterations():
    result, _ = _run(torch.zeros(BATCH, 3, 5), inner_steps=3)
    assert result.errors == [None, None]
    assert result.iterations.dtype == torch.long
    assert result.iterations.tolist() == [[3, 3], [3, 3]]


def test_a_non_finite_loss_names_the_default_loop_the_step_and_the_timestep():
    fixed = torch.zeros(BATCH, 3, 5)
    fixed[1] = float("inf")
    result, schedule = _run(fixed, inner_steps=2)
    first = int(schedule.timesteps[0])
    assert result.errors == [
        None,
        f"image 1: non-finite loss in embedding optimisation at step 0 (timestep {first})",
    ]
    assert result.iterations[:, 1].tolist() == [1, 0]  # stopped after its first non-finite loss


def test_non_finite_reconstruction_latents_are_named_as_the_loops_reconstruction_step():
    fixed = torch.zeros(BATCH, 3, 5)
    fixed[0] = float("inf")
    result, schedule = _run(fixed, inner_steps=0, loop="null-text optimisation")
    first = int(schedule.timesteps[0])
    assert result.errors == [
        f"image 0: non-finite latents in null-text optimisation (reconstruction step) at step 0 (timestep {first})",
        None,
    ]


def test_an_image_stops_once_its_loss_falls_below_the_threshold_and_not_at_it():
    """The reference null-text loop breaks on `loss < epsilon`: a loss equal to the threshold goes on."""
    errors = [None, None, None]
    still = _still_active([0, 1, 2], [0.5, 0.49, 0.51], 3, 100, lambda step: 0.5, errors, "loop")
    assert still == [0, 2] and errors == [None, None, None]
    assert _still_active([0, 1], [0.0, 1.0], 0, 100, None, errors, "loop") == [0, 1]
