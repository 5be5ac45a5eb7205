"""Inversion and editing quality per method on the shapes world, against ground-truth edits.

    python -m benchmarks.world_editing [--scenes 8] [--steps 20] [--guidance 7.5] [--learning-rates 0.05] [--write]

For held-out one-object scenes (seeds disjoint from training), every inversion method inverts the
scene with its caption at guidance w, then edits the primary object's shape by a Prompt-to-Prompt
word swap. Reported per method (means over scenes):

- recon_psnr_db: reconstruction vs source; vae_psnr_db, decode(encode(x)), is the ceiling.
- gt_psnr_db / gt_psnr_changed_db / gt_psnr_unchanged_db: edited image vs the counterfactual render
  (the ground-truth edit), overall, inside the region the edit should change, and outside it.
- oracle_target_shape: fraction of edits the oracle reads as the target shape (colour and background
  kept: oracle_kept_color, oracle_kept_background).
Each method runs with its paper's defaults (the registry's: null-text lr 1e-2 with N = 10; prompt
tuning N = 1, beta = 0.1, plain gradient descent, encoding ratio 0.8, inverted with the target prompt).
A larger null-text learning rate (rows "METHOD (lr X)") lands closer to the pivots, so reconstruction
improves, but the optimised embedding then carries the image and the word swap edits less: the
reconstruction / editability trade-off.
--write stores the table under "editing" in assets/benchmark_metrics.json and rewrites MODEL_CARD.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.engine import (
    AttentionControl,
    EditRequest,
    InversionConfig,
    decode_latents,
    edit,
    encode_images,
    invert,
)
from pipeline.metrics.pixel import psnr
from pipeline.metrics.structure import structure_distance
from pipeline.models.loading import load_diffusion_model
from pipeline.training.world_data import HELDOUT_SEED_OFFSET, SD_FOLDER_NAME
from pipeline.world.groundtruth import edit_error, shape_swap_edits
from pipeline.world.model_card import ASSETS, write_model_card
from pipeline.world.oracle import load_oracle

METHODS = ("ddim", "negative_prompt", "null_text", "prompt_tuning", "direct")
OPTIMISED_METHODS = ("null_text", "prompt_tuning")  # the methods whose inner loop uses the learning rate


def _unit(images: torch.Tensor) -> torch.Tensor:
    return images.permute(0, 3, 1, 2).double() / 255.0


def _mean(values: torch.Tensor) -> float:
    finite = values[torch.isfinite(values)]
    return round(float(finite.mean()), 2) if len(finite) else float("inf")


def evaluate_method(
    model,
    oracle,
    edits,
    method: str,
    steps: int,
    guidance: float,
    learning_rate: float | None,
    image_encoder=None,
    settings: dict | None = None,
    structure_tokens=None,
) -> dict:
    """Invert, reconstruct and shape-edit every scene with one method; metrics against ground truth.

    `image_encoder` is passed to `invert` (style_diffusion's CLIP vision tower); `settings` are more
    method parameters; with `structure_tokens` (images (B, 3, H, W) in [0, 1] -> ViT tokens, CLS
    first) the edits' structure distance to their sources is reported too.
    """
    images = torch.as_tensor(np.stack([case.source.image for case in edits]))
    source_prompts = [case.source.caption for case in edits]
    target_prompts = [case.target.caption for case in edits]
    override = {} if learning_rate is None else {"learning_rate": learning_rate}
    config = InversionConfig.of(
        method, num_steps=steps, guidance_scale=guidance, **override, **(settings or {})
    )
    started = time.perf_counter()
    # Prompt tuning inverts towards the target prompt (Algorithm 1 initialises c_T from c*).
    prompts = target_prompts if config.info.default_prompt == "target" else source_prompts
    inversion = invert(model, images, prompts, config, image_encoder=image_encoder)
    invert_seconds = time.perf_counter() - started
    control = AttentionControl(mode="replace", cross_replace_steps=0.8, self_replace_steps=0.4)
    requests = [EditRequest(i, prompt, control) for i, prompt in enumerate(target_prompts)]
    started = time.perf_counter()
    results = edit(model, inversion, requests)
    edit_seconds = time.perf_counter() - started
    failed = [result.error for result in results if result.error] + [e for e in inversion.errors if e]
    if failed:
        raise RuntimeError(f"{method}: {failed[0]}")
    edited = torch.stack([result.image for result in results])
    errors = edit_error(edited, edits)
    readings = oracle.predict(edited.permute(0, 3, 1, 2).float() / 127.5 - 1.0)
    scores = {}
    if structure_tokens is not None:
        distance = structure_distance(
            structure_tokens(_unit(edited).float())[:, 1:], structure_tokens(_unit(images).float())[:, 1:]
        )
        scores["structure_dist_x1e3"] = round(float(distance.mean()) * 1e3, 3)
    return scores | {
        "recon_psnr_db": _mean(psnr(_unit(inversion.reconstructions), _unit(images))),
        "gt_psnr_db": _mean(errors["psnr_all"]),
        "gt_psnr_changed_db": _mean(errors["psnr_changed"]),
        "gt_psnr_unchanged_db": _mean(errors["psnr_unchanged"]),
        "oracle_target_shape": float(
            np.mean([r == c.value for r, c in zip(readings["shape"], edits, strict=True)])
        ),
        "oracle_kept_color": float(
            np.mean(
                [r == c.source.scene.objects[0].color for r, c in zip(readings["color"], edits, strict=True)]
            )
        ),
        "oracle_kept_background": float(
            np.mean(
                [r == c.source.scene.background for r, c in zip(readings["background"], edits, strict=True)]
            )
        ),
        "invert_seconds": round(invert_seconds, 1),
        "invert_seconds_per_image": round(invert_seconds / len(edits), 2),
        "edit_seconds": round(edit_seconds, 1),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--assets", default=str(ASSETS))
    parser.add_argument("--scenes", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps")
    parser.add_argument("--guidance", type=float, default=7.5, help="CFG scale of reconstruction and editing")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument(
        "--learning-rates",
        type=float,
        nargs="+",
        default=[5e-2],
        help="null-text lr / prompt tuning beta of extra rows 'METHOD (lr X)' for the methods that "
        "optimise; the plain rows use each method's defaults",
    )
    parser.add_argument("--write", action="store_true", help="record the numbers in the model card")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    assets = Path(args.assets)
    model = load_diffusion_model(assets / SD_FOLDER_NAME)
    oracle = load_oracle(assets)
    edits = shape_swap_edits(range(HELDOUT_SEED_OFFSET, HELDOUT_SEED_OFFSET + args.scenes))
    images = torch.as_tensor(np.stack([case.source.image for case in edits]))
    with torch.no_grad():
        vae_images = decode_latents(model, encode_images(model, images))
    table = {
        "setup": f"{args.scenes} held-out one-object scenes, shape word swap (P2P replace), "
        f"DDIM {args.steps} steps, w={args.guidance}, "
        "each method's paper defaults unless marked",
        "vae_psnr_db": _mean(psnr(_unit(vae_images), _unit(images))),
        "methods": {},
    }
    print(table["setup"])
    print(f"VAE reconstruction (ceiling): {table['vae_psnr_db']} dB")
    for learning_rate in [None, *args.learning_rates]:
        for method in args.methods:
            if learning_rate is not None and method not in OPTIMISED_METHODS:
                continue  # the method has no learning rate
            name = method if learning_rate is None else f"{method} (lr {learning_rate:g})"
            table["methods"][name] = evaluate_method(
                model, oracle, edits, method, args.steps, args.guidance, learning_rate
            )
            print(name, json.dumps(table["methods"][name]))
    if args.write:
        path = assets / "benchmark_metrics.json"
        record = json.loads(path.read_text()) if path.is_file() else {}
        record["editing"] = table
        path.write_text(json.dumps(record, indent=2))
        write_model_card(assets)
    return table


if __name__ == "__main__":
    main()
