"""The h-space reach benchmark (benchmarks/zip_reach.py): its pass against plain DDIM written out, the
levels it shifts, Adam recovering outputs that some Δh is known to produce, and the report end to end on a
tiny random-weight model at the world's 64 px."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from benchmarks import zip_reach
from pipeline.diffusion.ddim import ddim_move
from pipeline.editors import noise_fn_of
from pipeline.methods import diffusion_clip as dc
from pipeline.models.build import SDArchitecture, build_random_sd
from pipeline.models.loading import load_diffusion_model
from pipeline.training.diffusion_clip import differentiable_decode


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    # The UNet's output at full scale: the session's damped tiny model barely answers a shift of h.
    folder = tmp_path_factory.mktemp("reach-sd")
    build_random_sd(folder, SDArchitecture(image_size=32), seed=0, unet_output_scale=1.0)
    model = load_diffusion_model(str(folder))
    for module in (model.unet, model.vae, model.text_encoder):
        module.requires_grad_(False)
    noise_fn = noise_fn_of(model, model.unet, "")
    grid = dc.ReturnGrid.from_scheduler(model.scheduler, 600, 6)
    start = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    return model, noise_fn, grid, start


def test_the_shifted_levels_are_the_grids_timesteps_above_t_zip_from_t0_down(setting):
    _, _, grid, _ = setting
    timesteps = [int(t) for t in grid.timesteps]  # tau_0 = 0 < ... < tau_S = t0
    expected = sorted((t for t in timesteps[1:] if t > 300), reverse=True)
    assert zip_reach.shifted_levels(grid, 300) == expected
    assert expected[0] == 600 and len(expected) == 3  # 600, 500, 400 of the six-step grid to 600
    assert zip_reach.shifted_levels(grid, 600) == []


def test_the_pass_without_shifts_is_ddim_and_a_shift_below_t_zip_is_never_applied(setting):
    model, noise_fn, grid, start = setting
    with torch.no_grad():
        latents = start
        for level in range(grid.num_steps, 0, -1):
            noise = noise_fn(latents, int(grid.timesteps[level]))
            latents = ddim_move(noise, latents, grid.alpha(level), grid.alpha(level - 1))
        plain = zip_reach.pass_with_shifts(noise_fn, model.unet, grid, start, 300, {})
        shape = zip_reach.mid_shape(model.unet, noise_fn, start, 600)
        below = zip_reach.pass_with_shifts(noise_fn, model.unet, grid, start, 300, {200: torch.ones(shape)})
        above = zip_reach.pass_with_shifts(noise_fn, model.unet, grid, start, 300, {400: torch.ones(shape)})
    torch.testing.assert_close(plain, latents, rtol=1e-5, atol=1e-5)
    assert torch.equal(below, plain)
    assert (above - plain).abs().max() > 1e-3


def test_adam_recovers_an_output_that_known_shifts_produce(setting):
    model, noise_fn, grid, start = setting
    decode = lambda latents: differentiable_decode(model.vae, latents)  # noqa: E731
    shape = zip_reach.mid_shape(model.unet, noise_fn, start, 600)
    generator = torch.Generator().manual_seed(1)
    known = {t: 0.5 * torch.randn(shape, generator=generator) for t in zip_reach.shifted_levels(grid, 300)}
    with torch.no_grad():
        targets = decode(zip_reach.pass_with_shifts(noise_fn, model.unet, grid, start, 300, known))
        unshifted = decode(zip_reach.pass_with_shifts(noise_fn, model.unet, grid, start, 300, {}))
    assert float(torch.nn.functional.mse_loss(unshifted, targets)) > 1e-4  # the shifts move the output
    latents, losses = zip_reach.reach(noise_fn, model.unet, grid, start, 300, decode, targets, 30, 0.1)
    assert len(losses) == 31
    assert losses[0] == pytest.approx(float(torch.nn.functional.mse_loss(unshifted, targets)), rel=1e-4)
    with torch.no_grad():
        assert losses[-1] == pytest.approx(
            float(torch.nn.functional.mse_loss(decode(latents), targets)), rel=1e-4
        )
    assert losses[-1] < 0.05 * losses[0]


def test_a_window_without_shifted_levels_returns_the_plain_pass(setting):
    model, noise_fn, grid, start = setting
    decode = lambda latents: differentiable_decode(model.vae, latents)  # noqa: E731
    with torch.no_grad():
        plain = zip_reach.pass_with_shifts(noise_fn, model.unet, grid, start, 600, {})
    targets = torch.zeros_like(decode(plain))
    latents, losses = zip_reach.reach(noise_fn, model.unet, grid, start, 600, decode, targets, 5, 0.05)
    assert torch.equal(latents, plain) and len(losses) == 1


def test_windows_are_parsed_and_bad_ones_are_named():
    assert zip_reach.parse_window("800:300") == (800, 300)
    for text in ("800", "300:800", "a:b", "600:600"):
        with pytest.raises(argparse.ArgumentTypeError, match="t0:t_zip|t_zip < t0"):
            zip_reach.parse_window(text)


def test_the_report_reads_the_unshifted_pass_and_writes_its_json(tmp_path, monkeypatch):
    build_random_sd(tmp_path / "sd", SDArchitecture(image_size=64), seed=0, unet_output_scale=0.05)
    monkeypatch.setattr(zip_reach, "RESULTS", tmp_path / "results")
    args = ["--model", str(tmp_path / "sd"), "--scenes", "2", "--windows", "600:300", "--forward-steps", "2"]
    results = zip_reach.main([*args, "--generative-steps", "3", "--iterations", "2", "--write", "reach"])
    (window,) = results["windows"]
    assert (window["return_step"], window["zip_step"], window["shifted_levels"]) == (600, 300, 2)
    assert len(window["loss_first_last"]) == 2
    # The unshifted reading is the DDIM reconstruction of the sources, recomputed here.
    model = load_diffusion_model(str(tmp_path / "sd"))
    scenes = zip_reach.heldout_scenes(2, [("shape", "star")])
    sources, truths = zip_reach.sources_and_truths(scenes, "shape", "star")
    settings = zip_reach.EditSettings(return_step=600, forward_steps=2, generative_steps=3, prompt="")
    noise_fn = noise_fn_of(model, model.unet, "")
    grid = dc.ReturnGrid.from_scheduler(model.scheduler, 600, 3)
    with torch.no_grad():
        start = zip_reach.forward_to_return_step(model, sources, settings)
        latents = start
        for level in range(grid.num_steps, 0, -1):
            noise = noise_fn(latents, int(grid.timesteps[level]))
            latents = ddim_move(noise, latents, grid.alpha(level), grid.alpha(level - 1))
    reconstruction = zip_reach.decode_latents(model, latents)
    checks = zip_reach.judged(reconstruction, sources, truths, "shape", scenes)
    assert window["without_shift"]["gt_psnr_db"] == round(float(checks["gt_psnr_db"].mean()), 2)
    assert window["reached"]["source_gt_psnr_db"] == window["without_shift"]["source_gt_psnr_db"]
    assert json.loads((tmp_path / "results" / "reach.json").read_text())["windows"][0]["zip_step"] == 300
