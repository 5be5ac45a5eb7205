"""Held-out reconstruction of shapes-world VAEs off the world's palette, family by family and kind by kind.

    python -m benchmarks.vae_broad [VAE_FOLDER ...] [--scenes 256] [--output benchmarks/results/NAME.json]

VAE_FOLDER is a diffusers AutoencoderKL folder (default: the shipped `pipeline/world/assets/shapes-sd/vae`;
after `python -m pipeline.training vae-broad --set output=COPY`, COPY/shapes-sd/vae). The held-out sets
are the `vae-broad` stage's (`heldout_families`: the world's held-out scenes, and broad and near scenes
from seed 2,000,000, never trained on). For each folder: PSNR of decode(encode(x).mode()), mean and worst
per family (the numbers the stage records), the broad scenes' mean and worst per background kind, the
striped and checkered ones per stripe or check width, and the worst broad scenes with their background.
The issue's targets off the palette: >= 32 dB mean and >= 28 dB worst.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL

from pipeline.training.world_config import DEFAULT_CONFIG, load_train_config
from pipeline.training.world_data import BROAD_HELDOUT_SEED_OFFSET, heldout_families
from pipeline.training.world_vae import psnr_per_image, vae_reconstructions
from pipeline.world import broad

SHIPPED_VAE = "pipeline/world/assets/shapes-sd/vae"
WORST_SHOWN = 5


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


def breakdown(vae: AutoencoderKL, families: dict[str, np.ndarray], seeds: range) -> dict:
    """The readings of one VAE (module docstring); `seeds` are the broad family's, in order."""
    psnr = {
        name: psnr_per_image(vae_reconstructions(vae, images), images) for name, images in families.items()
    }
    backgrounds = [broad.broad_scene_with_background(seed)[1] for seed in seeds]
    worst = np.argsort(psnr["broad"])[:WORST_SHOWN]
    return {
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
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("vaes", nargs="*", default=[SHIPPED_VAE], help="AutoencoderKL folders")
    parser.add_argument("--scenes", type=int, default=256, help="held-out scenes per family")
    parser.add_argument("--output", default=None, help="also write the readings to this JSON file")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = load_train_config(DEFAULT_CONFIG, [f"vae_broad.heldout_scenes={args.scenes}"])
    families = heldout_families(config)
    seeds = range(BROAD_HELDOUT_SEED_OFFSET, BROAD_HELDOUT_SEED_OFFSET + args.scenes)
    results = {}
    for folder in args.vaes:
        vae = AutoencoderKL.from_pretrained(folder).eval()
        with torch.no_grad():
            results[folder] = breakdown(vae, families, seeds)
    print(json.dumps(results, indent=1), flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
