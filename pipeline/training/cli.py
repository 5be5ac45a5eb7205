"""Train the shapes world's models: VAE, open_clip model, UNet + CLIP text encoder, and oracle.

    python -m pipeline.training {vae|vae-decoder|clip|clip-guide|unet|vae-broad|oracle|all|card} [--config jobs/train_shapes_world.yaml]

(`python -m pipeline.world.train ...` is the same command.) Every stage is seeded, renders its scenes in
memory with `pipeline.world.generator`, stops at its step count or its wall-time budget (whichever
first), and records steps, wall time and held-out metrics in `OUTPUT/train_metrics.json`; every run
then rewrites MODEL_CARD.md (with sha256 of every weight file) from it, and `card` does only that.
The UNet stage trains on VAE latents cached once under `cache_dir`.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.config import ConfigError
from pipeline.training.world_clip import train_clip, train_clip_guide
from pipeline.training.world_config import DEFAULT_CONFIG, TrainConfig, load_train_config
from pipeline.training.world_oracle import train_oracle
from pipeline.training.world_unet import train_unet
from pipeline.training.world_vae import train_vae, train_vae_decoder
from pipeline.training.world_vae_broad import train_vae_broad
from pipeline.world.model_card import write_model_card


def stages(resume: bool = False) -> dict[str, Callable[[TrainConfig], object]]:
    """The stages in the order `all` runs them.

    vae-broad fine-tunes the VAE that the unet stage ships; the oracle comes last: it learns to read
    images decoded by that VAE.

    Args:
        resume: the vae stage continues from CACHE/vae's weights, the unet stage from OUTPUT/shapes-sd's.
    """
    return {
        "vae": lambda config: train_vae(config, resume=resume),
        "vae-decoder": train_vae_decoder,
        "clip": train_clip,
        "clip-guide": train_clip_guide,
        "unet": lambda config: train_unet(config, resume=resume),
        "vae-broad": train_vae_broad,
        "oracle": train_oracle,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.training",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("stage", choices=[*stages(), "all", "card"])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="training job YAML")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of the job file, e.g. --set unet.steps=100 (repeatable; value parsed as YAML)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the config's)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="vae: continue from CACHE/vae's weights; unet: from OUTPUT/shapes-sd's",
    )
    parser.add_argument(
        "--lr", type=float, default=None, help="unet: peak learning rate (default: the config's)"
    )
    parser.add_argument(
        "--max-minutes", type=float, default=None, help="unet: wall-time budget (default: the config's)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run the chosen stage(s), then rewrite OUTPUT/MODEL_CARD.md.

    Args:
        argv: the arguments (default: sys.argv[1:]).
    """
    args = parse_args(argv)
    try:
        config = load_train_config(args.config, args.overrides)
    except ConfigError as error:
        raise SystemExit(f"error: {error}") from error
    unet_overrides = {"lr": args.lr, "max_minutes": args.max_minutes}
    unet_overrides = {key: value for key, value in unet_overrides.items() if value is not None}
    if unet_overrides:
        config = dataclasses.replace(config, unet=dataclasses.replace(config.unet, **unet_overrides))
    torch.set_num_threads(args.threads or config.threads)
    chosen = stages(resume=args.resume)
    order = list(chosen) if args.stage == "all" else [] if args.stage == "card" else [args.stage]
    for name in order:
        try:
            chosen[name](config)
        except (ConfigError, FileNotFoundError) as error:
            # A stage's own check of its inputs (a missing model to resume, a job that does not fit it).
            raise SystemExit(f"error: {name}: {error}") from error
    write_model_card(Path(config.output), args.config)
