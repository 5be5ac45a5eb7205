"""Held-out reconstruction of shapes-world VAEs off the world's palette, family by family and kind by kind.

    python -m benchmarks.vae_broad [VAE_FOLDER ...] [--scenes 256] [--fit-steps 400]
                                   [--encoder-fit-steps 800] [--output benchmarks/results/NAME.json]

VAE_FOLDER is a diffusers AutoencoderKL folder (default: the shipped `pipeline/world/assets/shapes-sd/vae`;
after `python -m pipeline.training vae-broad --set output=COPY`, COPY/shapes-sd/vae). The held-out sets
are the `vae-broad` stage's (`heldout_families`: the world's held-out scenes, and broad and near scenes
from seed 2,000,000, never trained on). For each folder: PSNR of decode(encode(x).mode()), mean and worst
per family (the numbers the stage records), the broad scenes' mean and worst per background kind, the
striped and checkered ones per stripe or check width, and the worst broad scenes with their background.
With `--fit-steps N`, each worst scene also gets the decoder's reach: the PSNR of the best decode(z) over
N Adam steps on the latent z itself, from the encoder's mode, the decoder fixed. A reach far below the
target means no latent makes the decoder draw the scene (the decoder is the limit, not the encoder or the
code's size). Every reading also splits the broad scenes' error by distance from the image's edge
(`broad_error_by_ring`: the mean squared error of the outermost pixel ring, the next, ..., against the
interior's, and the PSNR with the frame left out), where a decoder's convolutions meet their zero padding.
With `--encoder-fit-steps K`, every broad scene is also read as the engine encodes it with
`inversion.encoder_fit_steps: K` (the encoder's latent refined by K Adam steps on the decoder's error,
`pipeline.models.vae.refine_latents`): mean, worst, per background kind, the worst scenes. The issue's
targets off the palette: >= 32 dB mean and >= 28 dB worst.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL

from pipeline.diffusion.decoder_fit import DEFAULT_LR, fit_latents
from pipeline.models.vae import from_scaled, refine_latents, to_scaled
from pipeline.training.world_config import DEFAULT_CONFIG, load_train_config
from pipeline.training.world_data import BROAD_HELDOUT_SEED_OFFSET, heldout_families
from pipeline.training.world_vae import decoded_images, psnr_per_image, vae_reconstructions
from pipeline.world import broad
from pipeline.world.oracle import images_to_tensor

SHIPPED_VAE = "pipeline/world/assets/shapes-sd/vae"
WORST_SHOWN = 5
FRAME_RINGS = 2  # pixel rings at the image's edge read apart from the interior
FIT_LR = 0.05  # Adam on unscaled latents, whose std is 1 / scaling_factor (about 3 for the world VAEs)


def mean_and_worst(psnr: np.ndarray) -> dict[str, float]:
    """{'psnr_mean_db', 'psnr_min_db', 'scenes'} of a set of PSNRs in dB, float (N,)."""
    return {
        "psnr_mean_db": round(float(psnr.mean()), 2),
        "psnr_min_db": round(float(psnr.min()), 2),
        "scenes": int(len(psnr)),
    }


def grouped(psnr: np.ndarray, keys: list) -> dict[str, dict[str, float]]:
    """`mean_and_worst` of the PSNRs sharing each key, keys in sorted order; None keys left out."""
    groups: dict = defaultdict(list)
    for value, key in zip(psnr, keys, strict=True):
        if key is not None:
            groups[key].append(value)
    return {str(key): mean_and_worst(np.array(groups[key])) for key in sorted(groups)}


def edge_distance(height: int, width: int) -> np.ndarray:
    """int (height, width): each pixel's distance in pixels from the nearest image edge (0 on the edge)."""
    rows = np.minimum(np.arange(height), np.arange(height)[::-1])
    cols = np.minimum(np.arange(width), np.arange(width)[::-1])
    return np.minimum(rows[:, None], cols[None, :])


def error_by_ring(reconstructions: np.ndarray, images: np.ndarray, rings: int = FRAME_RINGS) -> dict:
    """The reconstruction error by distance from the image's edge.

    Args:
        reconstructions: uint8 (N, H, W, 3).
        images: uint8 (N, H, W, 3), the originals.
        rings: pixel rings read apart (distances 0 .. rings - 1); the rest is the interior.

    Returns:
        {'interior_mse', 'rings': {distance: {'mse', 'ratio_to_interior'}}, 'without_frame'}: mean squared
        error in levels^2 over the set's pixels at each distance, and `mean_and_worst` of the PSNR of each
        image's interior alone.
    """
    squared = ((reconstructions.astype(np.float64) - images.astype(np.float64)) ** 2).mean(-1)
    distance = edge_distance(*squared.shape[1:])
    interior = squared[:, distance >= rings]  # (N, interior pixels)
    interior_mse = float(interior.mean())
    by_ring = {}
    for ring in range(rings):
        mse = float(squared[:, distance == ring].mean())
        by_ring[str(ring)] = {"mse": round(mse, 2), "ratio_to_interior": round(mse / interior_mse, 2)}
    interior_psnr = 10 * np.log10(255.0**2 / np.maximum(interior.mean(1), 1e-10))
    return {
        "interior_mse": round(interior_mse, 2),
        "rings": by_ring,
        "without_frame": mean_and_worst(interior_psnr),
    }


def decoder_reach(vae: AutoencoderKL, images: np.ndarray, steps: int, lr: float = FIT_LR) -> np.ndarray:
    """PSNR (dB) of the best decode(z) found by Adam on z from encode(x).mode(), the VAE's weights fixed.

    Args:
        vae: the autoencoder (its parameters should not require grad).
        images: uint8 (N, 64, 64, 3).
        steps: Adam steps on the latents (0: the encoder's own reconstruction).
        lr: Adam's learning rate on the latents.

    Returns:
        float (N,): per image, the PSNR of the latent with the lowest reconstruction error seen (the start
        included), decoded and rounded to uint8 as `vae_reconstructions` does.
    """
    pixels = images_to_tensor(images)
    with torch.no_grad():
        start = vae.encode(pixels).latent_dist.mode()
    best = fit_latents(lambda latents: vae.decode(latents).sample, pixels, start, steps, lr)
    return psnr_per_image(decoded_images(vae, best), images)


def encoder_fit_psnr(vae: AutoencoderKL, images: np.ndarray, steps: int, batch: int = 64) -> np.ndarray:
    """PSNR (dB) of the engine's encoding with `inversion.encoder_fit_steps` = `steps`, decoded.

    `pipeline.models.vae.refine_latents` from the scaled posterior mean at its default step size, as
    `encode_images` runs it; images fitted `batch` at a time (a latent's fit does not depend on its batch).

    Args:
        vae: the autoencoder (its parameters should not require grad).
        images: uint8 (N, 64, 64, 3).
        steps: Adam steps.
        batch: images fitted together.

    Returns:
        float (N,).
    """
    fitted = []
    for start in range(0, len(images), batch):
        pixels = images_to_tensor(images[start : start + batch])
        with torch.no_grad():
            latents = to_scaled(vae, vae.encode(pixels).latent_dist.mean)
        fitted.append(from_scaled(vae, refine_latents(vae, pixels, latents, steps)))
    return psnr_per_image(decoded_images(vae, torch.cat(fitted)), images)


def breakdown(
    vae: AutoencoderKL,
    families: dict[str, np.ndarray],
    seeds: range,
    fit_steps: int = 0,
    encoder_fit_steps: int = 0,
) -> dict:
    """The readings of one VAE (module docstring); `seeds` are the broad family's, in order."""
    reconstructions = {name: vae_reconstructions(vae, images) for name, images in families.items()}
    psnr = {name: psnr_per_image(reconstructions[name], images) for name, images in families.items()}
    backgrounds = [broad.broad_scene_with_background(seed)[1] for seed in seeds]
    worst = np.argsort(psnr["broad"])[:WORST_SHOWN]
    reading = {
        "families": {name: mean_and_worst(values) for name, values in psnr.items()},
        "broad_by_background": grouped(psnr["broad"], [background.kind for background in backgrounds]),
        "broad_periodic_by_width": grouped(psnr["broad"], [background.period for background in backgrounds]),
        "broad_worst_scenes": [
            {
                "seed": seeds[index],
                "background": backgrounds[index].kind,
                "width": backgrounds[index].period,
                "psnr_db": round(float(psnr["broad"][index]), 2),
            }
            for index in worst
        ],
        "broad_error_by_ring": error_by_ring(reconstructions["broad"], families["broad"]),
    }
    if fit_steps:
        reading["broad_worst_decoder_reach"] = decoder_reach_of(
            vae, families["broad"][worst], seeds, worst, fit_steps
        )
    if encoder_fit_steps:
        reading["broad_encoder_fit"] = encoder_fit_reading(
            vae, families["broad"], seeds, [background.kind for background in backgrounds], encoder_fit_steps
        )
    return reading


def encoder_fit_reading(
    vae: AutoencoderKL, images: np.ndarray, seeds: range, kinds: list[str], steps: int
) -> dict:
    """The broad family encoded with `inversion.encoder_fit_steps` = `steps` (`encoder_fit_psnr`);
    `kinds` are the scenes' background kinds, in order."""
    psnr = encoder_fit_psnr(vae, images, steps)
    return {
        "steps": steps,
        "lr": DEFAULT_LR,
        "broad": mean_and_worst(psnr),
        "broad_by_background": grouped(psnr, kinds),
        "broad_worst_scenes": [
            {"seed": seeds[index], "psnr_db": round(float(psnr[index]), 2)}
            for index in np.argsort(psnr)[:WORST_SHOWN]
        ],
    }


def decoder_reach_of(
    vae: AutoencoderKL, images: np.ndarray, seeds: range, indices: np.ndarray, steps: int
) -> dict:
    """{'fit_steps', 'lr', 'scenes': [{'seed', 'psnr_db'}]}: `decoder_reach` of the given broad scenes."""
    reach = decoder_reach(vae, images, steps)
    return {
        "fit_steps": steps,
        "lr": FIT_LR,
        "scenes": [
            {"seed": seeds[index], "psnr_db": round(float(value), 2)}
            for index, value in zip(indices, reach, strict=True)
        ],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("vaes", nargs="*", default=[SHIPPED_VAE], help="AutoencoderKL folders")
    parser.add_argument("--scenes", type=int, default=256, help="held-out scenes per family")
    parser.add_argument("--output", default=None, help="also write the readings to this JSON file")
    parser.add_argument(
        "--fit-steps",
        type=int,
        default=0,
        help="Adam steps on the latents of the worst scenes (decoder's reach)",
    )
    parser.add_argument(
        "--encoder-fit-steps",
        type=int,
        default=0,
        help="also read the broad scenes encoded as inversion.encoder_fit_steps=N encodes them",
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = load_train_config(DEFAULT_CONFIG, [f"vae_broad.heldout_scenes={args.scenes}"])
    families = heldout_families(config)
    seeds = range(BROAD_HELDOUT_SEED_OFFSET, BROAD_HELDOUT_SEED_OFFSET + args.scenes)
    results = {}
    for folder in args.vaes:
        vae = AutoencoderKL.from_pretrained(folder).eval().requires_grad_(False)
        results[folder] = breakdown(vae, families, seeds, args.fit_steps, args.encoder_fit_steps)
    print(json.dumps(results, indent=1), flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
