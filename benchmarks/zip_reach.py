"""How far can a frozen model's h-space reach? The upper bound of any ZIP encoder (evaluation only).

    python -m benchmarks.zip_reach [--scenes 16] [--windows 600:300 800:300] [--iterations 150] [--write]

A ZIP encoder (papers/000) edits by adding Δh = E_A(h_t, r) to the UNet's mid-block output at every
generative level above t_zip and taking the asymmetric step (eq. 5) there. Whatever the encoder and its
loss, its edits are outputs of that pass for *some* Δh per level. This benchmark asks which outputs the
pass can reach at all: for each held-out scene it optimises a free Δh per level (B, C, h', w') by Adam so
that the pass's final image matches the world's ground-truth edit (`generator.counterfactual`), then
reads the result like `benchmarks/zip_world.py` does (oracle success, faithful success, PSNR against the
truth). A per-image, per-level Δh supervised by the truth is more than any encoder of (h_t, r) trained by
CLIP can have, so its numbers bound every encoder at the same (t0, t_zip, S_for, S_gen) from above, up to
how well Adam optimises. Windows (t0:t_zip) compare return steps; Δh = 0 (the pass without an edit) is
reported beside each as the start.

Legend (papers/000; see `pipeline.methods.zip_attribute`):

    shifts[t]     the free Δh at the level with timestep t > t_zip, (B, C, h', w'), zero at the start
    x_t0          `forward_to_return_step`: deterministic DDIM forward of the source to t0 (eq. 12)
    x_0           `za.generate`: the asymmetric step above t_zip, DDIM below (Algorithm 1 lines 6-11)
    loss          mean squared error of DEC(x_0) against the ground-truth edit, both in [-1, 1]

`--write [NAME]` saves benchmarks/results/NAME.json (NAME: zip_reach).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.diffusion_clip_world import (
    heldout_scenes,
    judged,
    oracle_readings,
    sources_and_truths,
    truth_summary,
)
from pipeline.editors import EditSettings, forward_to_return_step, noise_fn_of
from pipeline.methods import diffusion_clip as dc
from pipeline.methods import zip_attribute as za
from pipeline.models.loading import load_diffusion_model
from pipeline.models.vae import decode_latents
from pipeline.training.diffusion_clip import differentiable_decode
from pipeline.world.oracle import HEADS, load_oracle

RESULTS = Path(__file__).parent / "results"


def shifted_levels(grid: dc.ReturnGrid, zip_step: int) -> list[int]:
    """The timesteps of the generative levels that take the asymmetric step (t > t_zip), from t0 down."""
    return [int(t) for t in grid.timesteps[1:].flip(0) if int(t) > zip_step]


def mid_shape(
    unet: torch.nn.Module, noise_fn: za.NoiseFn, latents: torch.Tensor, timestep: int
) -> torch.Size:
    """The shape of h (the mid block's output) for a batch of latents, (B, C, h', w')."""
    with torch.no_grad(), za.captured_mid_features(unet) as captured:
        noise_fn(latents, timestep)
    return captured[0].shape


def pass_with_shifts(
    noise_fn: za.NoiseFn,
    unet: torch.nn.Module,
    grid: dc.ReturnGrid,
    start_latents: torch.Tensor,
    zip_step: int,
    shifts: dict[int, torch.Tensor],
) -> torch.Tensor:
    """x_0 of the generative pass from x_t0 with Δh = shifts[t] at each level above t_zip.

    Args:
        noise_fn: eps_theta, differentiable; it must accept a batch of 2B.
        unet: the UNet `noise_fn` calls (the shift goes on its mid block).
        grid: the generative grid.
        start_latents: x_t0, (B, C, h, w).
        zip_step: t_zip.
        shifts: {timestep: Δh (B, C, h', w')}; a level above t_zip missing from it takes Δh = 0.

    Returns:
        x_0, (B, C, h, w), differentiable in the shifts.
    """

    def paired(latents: torch.Tensor, timestep: int) -> tuple[torch.Tensor, torch.Tensor]:
        def shift(features: torch.Tensor) -> torch.Tensor:
            return shifts[timestep] if timestep in shifts else torch.zeros_like(features)

        return za.paired_noise(noise_fn, unet, shift)(latents, timestep)

    return za.generate(noise_fn, paired, grid, start_latents, zip_step)


def reach(
    noise_fn: za.NoiseFn,
    unet: torch.nn.Module,
    grid: dc.ReturnGrid,
    start_latents: torch.Tensor,
    zip_step: int,
    decode: za.DecodeFn,
    targets: torch.Tensor,
    iterations: int,
    lr: float,
) -> tuple[torch.Tensor, list[float]]:
    """Adam on free per-level Δh towards target images; the final latents and the loss of each iteration.

    Args:
        noise_fn, unet, grid, start_latents, zip_step: as `pass_with_shifts`.
        decode: DEC, latents -> images in [-1, 1], differentiable.
        targets: (B, 3, H, W) in [-1, 1].
        iterations: Adam steps.
        lr: Adam's learning rate.

    Returns:
        x_0 with the last shifts, (B, C, h, w), detached; the loss before each step, then the final loss.
    """
    levels = shifted_levels(grid, zip_step)
    shape = mid_shape(unet, noise_fn, start_latents, levels[0]) if levels else None
    shifts = {t: torch.zeros(shape, requires_grad=True) for t in levels}
    optimiser = torch.optim.Adam(list(shifts.values()), lr=lr) if levels else None
    start_latents = start_latents.detach()
    losses = []
    for _ in range(iterations if levels else 0):
        latents = pass_with_shifts(noise_fn, unet, grid, start_latents, zip_step, shifts)
        loss = torch.nn.functional.mse_loss(decode(latents), targets)
        losses.append(float(loss.detach()))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        latents = pass_with_shifts(noise_fn, unet, grid, start_latents, zip_step, shifts)
        losses.append(float(torch.nn.functional.mse_loss(decode(latents), targets)))
    return latents, losses


def reading(
    oracle,
    edited: torch.Tensor,
    sources: torch.Tensor,
    truths: torch.Tensor,
    attribute: str,
    value: str,
    scenes,
):
    """Oracle success, the truth checks and the mean oracle probability of the target value."""
    names, probabilities = oracle_readings(oracle, edited)
    hits = np.array([name == value for name in names[attribute]])
    target = probabilities[attribute][:, HEADS[attribute].index(value)]
    return {
        "success": float(hits.mean()),
        **truth_summary(hits, judged(edited, sources, truths, attribute, scenes)),
        "target_probability_mean": round(float(target.mean()), 4),
    }


def evaluate_window(model, oracle, scenes, attribute: str, value: str, window: tuple[int, int], args) -> dict:
    return_step, zip_step = window
    sources, truths = sources_and_truths(scenes, attribute, value)
    settings = EditSettings(
        return_step=return_step,
        forward_steps=args.forward_steps,
        generative_steps=args.generative_steps,
        prompt="",
    )
    noise_fn = noise_fn_of(model, model.unet, settings.prompt)
    grid = dc.ReturnGrid.from_scheduler(model.scheduler, return_step, args.generative_steps)
    with torch.no_grad():
        start = forward_to_return_step(model, sources, settings)
        unshifted = decode_latents(model, pass_with_shifts(noise_fn, model.unet, grid, start, zip_step, {}))
    targets = truths.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    started = time.perf_counter()
    latents, losses = reach(
        noise_fn,
        model.unet,
        grid,
        start,
        zip_step,
        lambda x: differentiable_decode(model.vae, x),
        targets,
        args.iterations,
        args.lr,
    )
    seconds = time.perf_counter() - started
    reached = decode_latents(model, latents)
    return {
        "return_step": return_step,
        "zip_step": zip_step,
        "shifted_levels": len(shifted_levels(grid, zip_step)),
        "without_shift": reading(oracle, unshifted, sources, truths, attribute, value, scenes),
        "reached": reading(oracle, reached, sources, truths, attribute, value, scenes),
        "loss_first_last": [round(losses[0], 5), round(losses[-1], 5)],
        "seconds": round(seconds, 1),
    }


def parse_window(text: str) -> tuple[int, int]:
    """'600:300' -> (t0, t_zip) = (600, 300), t_zip < t0."""
    try:
        return_step, zip_step = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a window is t0:t_zip such as 600:300, got {text!r}") from None
    if not 0 <= zip_step < return_step:
        raise argparse.ArgumentTypeError(f"a window needs 0 <= t_zip < t0, got {text!r}")
    return return_step, zip_step


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="pipeline/world/assets/shapes-sd")
    parser.add_argument("--attribute", default="shape")
    parser.add_argument("--value", default="star")
    parser.add_argument("--scenes", type=int, default=16)
    parser.add_argument("--windows", type=parse_window, nargs="+", default=[(600, 300), (800, 300)])
    parser.add_argument("--forward-steps", type=int, default=50, help="S_for")
    parser.add_argument("--generative-steps", type=int, default=20, help="S_gen")
    parser.add_argument("--iterations", type=int, default=150)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--write", nargs="?", const="zip_reach", default=None, metavar="NAME")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = load_diffusion_model(args.model)
    for module in (model.unet, model.vae, model.text_encoder):
        module.requires_grad_(False)
    oracle = load_oracle()
    scenes = heldout_scenes(args.scenes, [(args.attribute, args.value)])
    results = {
        "setup": (
            f"{args.scenes} held-out one-object scenes, {args.attribute} -> {args.value}, "
            f"S_for={args.forward_steps}, S_gen={args.generative_steps}, Adam lr {args.lr} x {args.iterations}"
        ),
        "windows": [],
    }
    for window in args.windows:
        results["windows"].append(
            evaluate_window(model, oracle, scenes, args.attribute, args.value, window, args)
        )
        print(json.dumps(results["windows"][-1]), flush=True)
    if args.write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{args.write}.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
