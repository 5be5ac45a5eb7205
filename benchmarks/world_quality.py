"""Quality of the trained shapes world: oracle accuracy of generated samples, VAE reconstruction PSNR.

    python -m benchmarks.world_quality [--samples-per-caption 32] [--steps 20] [--guidance 5] [--write]

(a) For every held-out caption of the training job (one-object captions never rendered for training)
    and as many in-distribution captions, samples images with DDIM + CFG from the shipped diffusers
    folder (loaded with `load_diffusion_model`, as any SD checkpoint) and reports the fraction that the
    oracle reads as the caption's shape, colour and background.
(b) VAE reconstruction PSNR of held-out scenes (decode(encode(x).mode())).
    The oracle's accuracy on those reconstructions is the ceiling of (a): decoded images are softer
    than renders, and a judge that misreads them caps the agreement of any sample.
(c) Top-1 caption retrieval of the shapes-world open_clip model on held-out scenes (among 144 captions).
--write stores the numbers in assets/benchmark_metrics.json and rewrites MODEL_CARD.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.models.loading import load_diffusion_model
from pipeline.training.world_clip import clip_caption_accuracy
from pipeline.training.world_config import DEFAULT_CONFIG, load_train_config
from pipeline.training.world_data import SD_FOLDER_NAME, heldout_scenes
from pipeline.training.world_oracle import oracle_accuracy
from pipeline.training.world_vae import vae_psnr, vae_reconstructions
from pipeline.world import generator
from pipeline.world.model_card import ASSETS, write_model_card
from pipeline.world.oracle import load_oracle
from pipeline.world.sampling import sample_images


def oracle_agreement(
    model, oracle, captions: list[str], per_caption: int, steps: int, guidance: float, seed: int
) -> dict:
    """Fraction of samples whose oracle reading matches the caption, per attribute."""
    prompts = [caption for caption in captions for _ in range(per_caption)]
    images = torch.cat(
        [
            sample_images(model, prompts[s : s + 64], guidance, steps, seed + s)
            for s in range(0, len(prompts), 64)
        ]
    )
    predicted = oracle.predict(images.permute(0, 3, 1, 2).float() / 127.5 - 1.0)
    truth = [generator.parse_caption(prompt) for prompt in prompts]
    expected = {
        "shape": [t["objects"][0]["shape"] for t in truth],
        "color": [t["objects"][0]["color"] for t in truth],
        "background": [t["background"] for t in truth],
    }
    return {name: float(np.mean(np.array(predicted[name]) == np.array(expected[name]))) for name in expected}


def oracle_on_vae_reconstructions(model, oracle, scenes) -> dict[str, float]:
    """Oracle accuracy per attribute on decode(encode(x)) of rendered one-object scenes: how well the judge
    reads decoded images at all, the ceiling of the sample agreement above."""
    return oracle_accuracy(
        oracle, dataclasses.replace(scenes, images=vae_reconstructions(model.vae, scenes.images))
    )


def in_distribution_captions(config, count: int, seed: int) -> list[str]:
    """`count` distinct one-object training captions (not held out)."""
    held_out = set(config.data.heldout_captions)
    rng = np.random.default_rng(seed)
    captions: list[str] = []
    while len(captions) < count:
        caption = generator.one_object_caption(
            str(rng.choice(tuple(generator.COLORS))),
            str(rng.choice(generator.SHAPES)),
            str(rng.choice(generator.BACKGROUNDS)),
        )
        if caption not in held_out and caption not in captions:
            captions.append(caption)
    return captions


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--assets", default=str(ASSETS))
    parser.add_argument("--samples-per-caption", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps")
    parser.add_argument("--guidance", type=float, default=5.0, help="CFG scale")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write", action="store_true", help="record the numbers in the model card")
    args = parser.parse_args(argv)
    config = load_train_config(args.config)
    assets = Path(args.assets)
    start = time.time()
    model = load_diffusion_model(assets / SD_FOLDER_NAME)
    oracle = load_oracle(assets)
    held_out = list(config.data.heldout_captions)
    sampling = f"DDIM {args.steps} steps, CFG {args.guidance}, {args.samples_per_caption} samples per caption"
    results = {
        "sampling": sampling,
        "oracle_agreement_heldout_captions": oracle_agreement(
            model, oracle, held_out, args.samples_per_caption, args.steps, args.guidance, args.seed
        ),
        "oracle_agreement_training_captions": oracle_agreement(
            model,
            oracle,
            in_distribution_captions(config, len(held_out), args.seed),
            args.samples_per_caption,
            args.steps,
            args.guidance,
            args.seed,
        ),  # fmt: skip
        "vae_psnr_db_heldout": vae_psnr(model.vae, heldout_scenes(config).images),
        "oracle_accuracy_on_vae_reconstructions": oracle_on_vae_reconstructions(
            model, oracle, heldout_scenes(config, two_object_fraction=0.0)
        ),
    }
    from pipeline.world.clip_model import load_shapes_clip

    clip_model, _, clip_tokenizer = load_shapes_clip(weights=assets / "shapes_clip.safetensors")
    results.update(
        clip_caption_accuracy(clip_model, clip_tokenizer, heldout_scenes(config, two_object_fraction=0.0))
    )
    results["benchmark_wall_s"] = round(time.time() - start)
    for key, value in results.items():
        print(f"{key}: {value}")
    if args.write:
        path = assets / "benchmark_metrics.json"
        # Keep what other benchmarks recorded there (world_editing's "editing" table).
        record = (
            {key: value for key, value in json.loads(path.read_text()).items() if key == "editing"}
            if path.is_file()
            else {}
        )
        path.write_text(json.dumps({**results, **record}, indent=2))
        write_model_card(
            assets, Path(args.config).name if Path(args.config) == DEFAULT_CONFIG else args.config
        )
    return results


if __name__ == "__main__":
    main()
