"""Stochastic edits on held-out shapes-world scenes: diversity against faithfulness for K samples per image
and sampling temperatures (papers/003, eq. 5), judged by the oracle and by the rendered ground truth.

    python -m benchmarks.stochastic_world --vae out/vaes/star/artefact --scenes 8 \
        --samples 1 4 8 --temperatures 0.5 1 2

Every held-out one-object non-star scene is inverted once (direct inversion, 20 steps, w = 5: the shapes
demo's settings) and edited into a star with the demo's Prompt-to-Prompt word swap and local blend. The
deterministic edit is the reference row; then, for every (K, temperature), K samples per scene drawn from
the conditional-embedding VAE (`stochastic: cond_vae`), all scenes' samples in one edit call. Per row:

- diversity: mean pairwise oracle-feature perceptual distance among each scene's K samples (eq. 5's
  LPIPS(I', I'')), beside its bound, the samples' mean distance to the source (LPIPS(I, I'));
- star_rate: fraction the oracle reads as a star; background_psnr: PSNR to the source outside the
  rendered source object and the rendered counterfactual star (the region the edit may change);
  mask_background_psnr: outside the edit's own cross-attention mask instead (the job's bg_psnr);
- colour_readings: mean number of distinct colours the oracle reads among a scene's samples;
  region_colour_std: std over a scene's samples of the mean colour inside that region (grey levels),
  region_area_std: std of the number of pixels there that differ from the background by > 48 levels:
  attributes the prompt leaves open (shade, size), measured rather than looked at.

Writes benchmarks/results/stochastic_world_cond_vae.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.diffusion_clip_world import heldout_scenes, oracle_readings
from pipeline.editors import load_embedding_vae
from pipeline.engine import AttentionControl, EditRequest, InversionConfig, edit, invert
from pipeline.metrics import build_perceptual, psnr
from pipeline.metrics.diversity import mean_pairwise_distance
from pipeline.models.loading import load_diffusion_model
from pipeline.world import generator
from pipeline.world.oracle import load_oracle, perceptual_features

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
AREA_THRESHOLD = 48  # grey levels from the background colour that count as object


def unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [0, 1]."""
    return images.permute(0, 3, 1, 2).float() / 255.0


def rendered_scenes(count: int):
    """Held-out non-star scenes: sources, their counterfactual stars, and the region either occupies."""
    scenes = heldout_scenes(count, avoid=[("shape", "star")])
    sources = [generator.render(scene) for scene in scenes]
    stars = [generator.counterfactual(scene, "shape", "star") for scene in scenes]
    regions = torch.stack(
        [torch.from_numpy(s.masks.any(0) | t.masks.any(0)) for s, t in zip(sources, stars, strict=True)]
    )
    shapes = [scene.objects[0].shape for scene in scenes]
    return sources, shapes, regions


def scene_scores(
    edited: torch.Tensor, source: torch.Tensor, region: torch.Tensor, masks: torch.Tensor, oracle, distance
) -> dict:
    """Per-scene statistics of its samples: uint8 (K, H, W, 3) edits of one source (H, W, 3), the rendered
    region the edit may change (H, W) and each edit's own mask (K, H, W) from its cross-attention."""
    names, _ = oracle_readings(oracle, edited)
    samples = unit(edited)
    background = (~region)[None].expand(len(edited), -1, -1)
    inside = edited[:, region].float()  # (K, P, 3)
    background_colour = source[~region].float().median(dim=0).values
    area = ((inside - background_colour).abs().amax(dim=-1) > AREA_THRESHOLD).sum(dim=1).float()
    return {
        "diversity": mean_pairwise_distance(samples, distance),
        "bound": float(distance(samples, unit(source[None]).expand_as(samples)).mean()),
        "star_rate": float(np.mean([shape == "star" for shape in names["shape"]])),
        "background_psnr": float(psnr(samples, unit(source[None]).expand_as(samples), background).mean()),
        "mask_background_psnr": float(psnr(samples, unit(source[None]).expand_as(samples), ~masks).mean()),
        "colour_readings": len(set(names["color"])),
        "region_colour_std": float(inside.mean(dim=1).std(dim=0, unbiased=False).mean()),
        "region_area_std": float(area.std(unbiased=False)),
    }


def summarise(per_scene: list[dict]) -> dict:
    """Means over scenes; None where no scene has a value (diversity of K = 1)."""
    means = {}
    for key in per_scene[0]:
        values = [scores[key] for scores in per_scene if not np.isnan(scores[key])]
        means[key] = float(np.mean(values)) if values else None
    return means


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    model = load_diffusion_model(args.model, device="cpu")
    vae = load_embedding_vae(model, args.vae)
    oracle = load_oracle()
    distance = build_perceptual(
        "features:shapes-oracle", device="cpu", feature_extractor=perceptual_features()
    )
    sources, shapes, regions = rendered_scenes(args.scenes)
    images = torch.stack([torch.from_numpy(s.image) for s in sources])
    captions = [s.caption for s in sources]
    targets = [caption.replace(shape, "star") for caption, shape in zip(captions, shapes, strict=True)]
    controls = [
        AttentionControl(
            "replace",
            cross_replace_steps=0.8,
            self_replace_steps=0.4,
            blend_words=(shape, "star"),
            blend_threshold=0.3,
        )
        for shape in shapes
    ]
    started = time.perf_counter()
    inversion = invert(
        model, images, captions, InversionConfig.of("direct", num_steps=args.steps, guidance_scale=5.0)
    )
    invert_seconds = time.perf_counter() - started

    def edits(samples: int, temperature: float | None) -> torch.Tensor:
        requests = [
            EditRequest(
                scene,
                targets[scene],
                controls[scene],
                seed=seed,
                sample_temperature=temperature,
                embedding_vae=None if temperature is None else vae,
            )
            for scene in range(len(sources))
            for seed in range(samples)
        ]
        results = edit(model, inversion, requests)
        edited = torch.stack([result.image for result in results]).view(
            len(sources), samples, *images.shape[1:]
        )
        masks = torch.stack([result.mask for result in results]).view(
            len(sources), samples, *images.shape[1:3]
        )
        return edited, masks

    deterministic, deterministic_masks = edits(1, None)
    rerun, _ = edits(1, None)
    rows = [
        {
            "samples": 1,
            "temperature": None,
            "reruns_identical": bool(torch.equal(deterministic, rerun)),
            **summarise(
                [
                    scene_scores(
                        deterministic[i], images[i], regions[i], deterministic_masks[i], oracle, distance
                    )
                    for i in range(len(sources))
                ]
            ),
        }
    ]
    for temperature in args.temperatures:
        for samples in args.samples:
            started = time.perf_counter()
            edited, masks = edits(samples, temperature)
            seconds = (time.perf_counter() - started) / (samples * len(sources))
            scores = [
                scene_scores(edited[i], images[i], regions[i], masks[i], oracle, distance)
                for i in range(len(sources))
            ]
            rows.append(
                {
                    "samples": samples,
                    "temperature": temperature,
                    "seconds_per_edit": seconds,
                    **summarise(scores),
                }
            )
            print(json.dumps(rows[-1]))
    return {
        "vae": args.vae,
        "vae_version": vae.version,
        "scenes": len(sources),
        "steps": args.steps,
        "invert_seconds_per_image": invert_seconds / len(sources),
        "rows": rows,
    }


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    reference = table["rows"][0]
    sampled = [row for row in table["rows"][1:] if row["samples"] > 1]
    for temperature in sorted({row["temperature"] for row in sampled}):
        rows = [row for row in sampled if row["temperature"] == temperature]
        for axis, key in zip(axes, ("background_psnr", "star_rate"), strict=True):
            axis.plot(
                [r["diversity"] for r in rows],
                [r[key] for r in rows],
                "o-",
                label=f"temperature {temperature}",
            )
            for row in rows:
                axis.annotate(f"K={row['samples']}", (row["diversity"], row[key]), fontsize=7)
    for axis, key, label in zip(
        axes, ("background_psnr", "star_rate"), ("background PSNR (dB)", "oracle star rate"), strict=True
    ):
        axis.axhline(reference[key], color="grey", linestyle="--", label="deterministic edit")
        axis.set_xlabel("diversity: mean pairwise oracle-feature distance")
        axis.set_ylabel(label)
        axis.legend(fontsize=7)
    figure.suptitle(f"cond_vae samples on {table['scenes']} held-out scenes")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--vae", required=True, help="the cond_vae artefact (inversa train jobs/train_cond_vae_star.yaml)"
    )
    parser.add_argument("--model", default=str(ROOT / "pipeline" / "world" / "assets" / "shapes-sd"))
    parser.add_argument("--scenes", type=int, default=8)
    parser.add_argument("--samples", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--output", default=str(RESULTS / "stochastic_world_cond_vae"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    table = run(args)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps(table, indent=2) + "\n")
    plot(table, output.with_suffix(".png"))
    print(json.dumps(table["rows"][0]))
    return table


if __name__ == "__main__":
    main()
