"""The shared training loop: seeding, the step/time budget, optimisation, checkpoints, the metrics record."""

import json

import numpy as np
import pytest
import torch

from pipeline.models.build import SDArchitecture, build_vae
from pipeline.training.loop import (
    Budget,
    MetricsLog,
    Progress,
    load_in_memory,
    optimize,
    replace_folder,
    seed_everything,
)


def test_budget_stops_at_steps_and_decays_lr():
    budget = Budget(steps=10, max_minutes=60)
    factors = []
    while budget.running():
        factors.append(budget.lr_factor(warmup_steps=2))
        budget.step += 1
    assert budget.step == 10
    assert factors[0] < factors[1] and factors[-1] < factors[2]


def test_budget_stops_at_its_time_limit():
    budget = Budget(steps=10**9, max_minutes=1e-9)
    assert budget.progress() == 1.0 and not budget.running()


def test_seed_everything_seeds_torch_and_numpy():
    first = seed_everything(7)
    draws = (torch.rand(3), first.random(3))
    second = seed_everything(7)
    assert torch.equal(draws[0], torch.rand(3)) and np.array_equal(draws[1], second.random(3))


def test_optimize_sets_the_scheduled_lr_clips_and_reports_every_step():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.tensor([3.0, -4.0]))
    optimizer = torch.optim.SGD([weight], lr=0.0)
    budget = Budget(steps=4, max_minutes=1e6)
    lrs, steps, grads, losses = [], [], [], []

    def loss_step():
        lrs.append(0.5 * budget.lr_factor(warmup_steps=2))
        losses.append(10.0 * (weight**2).sum())
        return losses[-1]

    def after_step(step):
        steps.append(step)
        grads.append(weight.grad.norm().item())
        assert optimizer.param_groups[0]["lr"] == pytest.approx(lrs[-1])

    last = optimize(
        loss_step,
        optimizer,
        budget,
        stage="test",
        peak_lr=0.5,
        warmup_steps=2,
        max_grad_norm=1.0,
        after_step=after_step,
    )
    assert budget.step == 4 and steps == [1, 2, 3, 4]
    assert all(grad == pytest.approx(1.0) for grad in grads)  # the raw gradients are far larger
    assert last == losses[-1].item() and losses[-1].item() < losses[0].item() == 250.0


def test_optimize_without_steps_returns_nan():
    weight = torch.nn.Parameter(torch.zeros(1))
    budget = Budget(steps=1, max_minutes=1e-9)
    assert np.isnan(optimize(lambda: weight.sum(), torch.optim.SGD([weight]), budget, stage="t", peak_lr=1.0))


def test_metrics_log_records_forgets_and_sums_progress(tmp_path, capsys):
    log = MetricsLog(tmp_path / "out")
    assert log.read() == {} and log.progress("unet") == Progress()
    log.record("unet", {"steps": 5, "wall_s": 7})
    assert "[unet]" in capsys.readouterr().out
    assert log.progress("unet") == Progress(5, 7)
    log.record("vae", {"steps": 1})
    log.record("unet", {"steps": 2, "wall_s": 1, "total_steps": 12, "total_wall_s": 30})
    assert log.progress("unet") == Progress(12, 30)
    log.forget("vae")
    assert set(json.loads(log.path.read_text())) == {"unet"}
    budget = Budget(steps=3, max_minutes=1.0)
    budget.step = 3
    assert Progress(12, 30).after(budget) == Progress(15, 30)


def test_replace_folder_swaps_whole_and_keeps_the_old_on_failure(tmp_path):
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "old.txt").write_text("old")

    def failing(staging):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        replace_folder(folder, failing)
    assert (folder / "old.txt").read_text() == "old"

    def save(staging):
        staging.mkdir(exist_ok=True)
        (staging / "new.txt").write_text("new")

    assert replace_folder(folder, save) == folder
    assert [path.name for path in folder.iterdir()] == ["new.txt"]
    assert not folder.with_name("vae.staging").exists()


def test_model_loaded_in_memory_survives_its_folder_being_rewritten(tmp_path):
    """The unet stage reads the VAE it resumes with from the folder it then writes: the loaded weights must
    not stay mapped to the file (rewriting a mapped file under a live model is a bus error)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    build_vae(SDArchitecture(image_size=32, vae_channels=(8, 16))).save_pretrained(tmp_path)
    vae = load_in_memory(AutoencoderKL, tmp_path)
    before = [parameter.clone() for parameter in vae.parameters()]
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 64)
    assert all(torch.equal(a, b) for a, b in zip(before, vae.parameters(), strict=True))
