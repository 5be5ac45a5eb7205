"""A ZIP attribute encoder on held-out shapes-world scenes, judged by the oracle (evaluation only).

    python -m benchmarks.zip_world out/editors/zip-star/artefact [--scenes 32] [--write]

For held-out one-object scenes (seeds from HELDOUT_SEED_OFFSET, disjoint from training) whose attribute
does not already have the encoder's value, reported:

- success: fraction the oracle reads as the target value, with the encoder's own first reference
  (rendered by the model at training time); kept_*: fraction whose other attributes stay the source's;
  faithful_success, closer_than_source, gt_psnr_db: against the world's ground-truth edit, as in
  `benchmarks/diffusion_clip_world.py` (here and in each consistency reading), with sized_success and
  faithful_sized_success (the edit's object keeping the truth's size required too).
- frozen: the UNet's, VAE's and text encoder's fingerprint before and after every edit, and the one the
  artefact was trained on; all three must be equal (the model is never changed).
- transition: mean oracle probability of the target value at Δh scales 0, 0.25, ..., 1.
- consistency: a fixed user reference (a star scene drawn by the world's renderer, not generated)
  against text-only editing of the same scenes (direct inversion + Prompt-to-Prompt word swap to the
  target caption): the standard deviation over scenes of the oracle's probability of the target value
  (lower = more consistent), and its success rate.
- references: how far the edits move when the reference changes (mean absolute pixel difference
  between edits with two different references), against the edits' distance from their sources.
- style: whether the edit takes the colour of its reference (the paper's Fig. 5: one reference, one
  style on every image). For a renderer-drawn star of each world colour as the user's reference: the
  share of edits the oracle reads in that colour, their success as a star of that colour (and faithful,
  of the truth's size, against the world's star of that colour), the spread over scenes of the
  oracle's probability of that colour, and the spread of the colours read (`color_spread`:
  `pipeline.metrics.diversity.attribute_spread` of the oracle's colour probabilities, the variance of the
  edited attribute over the scenes); beside the text-only word swap to the plain target (the colour
  stays the source's) and to the target with the colour named ("a red star ..."); ZIP's colour spread
  minus each word swap's, averaged over the colours, with a 95% paired bootstrap interval over scenes
  (`color_spread_difference`); and for the encoder's own references, one per colour the oracle reads in
  them, the share of edits in that colour.

`--write [NAME]` saves the JSON to benchmarks/results/NAME.json and a strip of examples to NAME.png (NAME:
zip_world).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from benchmarks.diffusion_clip_world import (
    _value,
    edited_scene,
    heldout_scenes,
    judged,
    oracle_readings,
    text_only_edits,
    truth_summary,
)
from pipeline.editors import (
    EditSettings,
    ZipEncoder,
    forward_to_return_step,
    generate_with_zip,
    load_editor,
    zip_reference_code,
)
from pipeline.metrics.diversity import attribute_spread
from pipeline.models.loading import fingerprint_modules, load_diffusion_model
from pipeline.world import generator
from pipeline.world.oracle import HEADS, load_oracle

RESULTS = Path(__file__).parent / "results"
USER_REFERENCE = generator.Scene(
    objects=(generator.SceneObject(shape="star", color="red", center=(32.0, 32.0), radius=20.0),),
    background="white",
    seed=0,
)


STYLE = "color"


def user_reference(color: str) -> torch.Tensor:
    """USER_REFERENCE drawn in `color`, uint8 (H, W, 3)."""
    star = dataclasses.replace(USER_REFERENCE.objects[0], color=color)
    return torch.as_tensor(generator.render(dataclasses.replace(USER_REFERENCE, objects=(star,))).image)


def model_fingerprint(model) -> str:
    return fingerprint_modules(model.unet, model.vae, model.text_encoder)


def _target_probability(probabilities: dict[str, torch.Tensor], attribute: str, value: str) -> torch.Tensor:
    return probabilities[attribute][:, HEADS[attribute].index(value)]


def spread(
    oracle,
    edited: torch.Tensor,
    attribute: str,
    value: str,
    sources: torch.Tensor,
    truths: torch.Tensor,
    scenes,
) -> dict[str, float]:
    names, probabilities = oracle_readings(oracle, edited)
    target = _target_probability(probabilities, attribute, value)
    hit = np.array([name == value for name in names[attribute]])
    checks = judged(edited, sources, truths, attribute, scenes)
    return {
        "success": float(hit.mean()),
        **truth_summary(hit, checks),
        "target_probability_mean": round(float(target.mean()), 4),
        "target_probability_std": round(float(target.std()), 4),
    }


def styled_truths(scenes, attribute: str, value: str, color: str) -> torch.Tensor:
    """The world's edit of each scene to `value` in `color`, uint8 (N, H, W, 3)."""
    changes = {STYLE: color, attribute: value}
    return torch.as_tensor(
        np.stack([generator.render(edited_scene(scene, changes)).image for scene in scenes])
    )


def styled(
    oracle,
    edited: torch.Tensor,
    attribute: str,
    value: str,
    color: str,
    sources: torch.Tensor,
    truths: torch.Tensor,
    scenes,
) -> dict[str, float]:
    """Edits to `value` meant to come in `color`, read against the world's edit to both (`truths`, from
    `styled_truths`).

    Returns:
        followed (share read in `color`), success (read as `value` and in `color`), the truth readings of
        `truth_summary` against the scenes with both changed, the mean and std over scenes of the
        oracle's probability of `color`, and the spread of the colours read (`attribute_spread`).
    """
    names, probabilities = oracle_readings(oracle, edited)
    in_color = np.array([name == color for name in names[STYLE]])
    hit = in_color & np.array([name == value for name in names[attribute]])
    probability = _target_probability(probabilities, STYLE, color)
    return {
        "followed": float(in_color.mean()),
        "success": float(hit.mean()),
        **truth_summary(hit, judged(edited, sources, truths, attribute, scenes)),
        "color_probability_mean": round(float(probability.mean()), 4),
        "color_probability_std": round(float(probability.std()), 4),
        "color_spread": round(attribute_spread(probabilities[STYLE]), 4),
    }


def spread_difference_interval(
    first: torch.Tensor, second: torch.Tensor, draws: int = 2000, seed: int = 0
) -> dict[str, float]:
    """How much less the colours of one method's edits spread than another's, with a paired bootstrap over
    scenes (the same scenes drawn for both methods and every reference colour).

    Args:
        first, second: (C, N, K) the oracle's colour probabilities of each method's N edits made for
            each of C reference colours, on the same N scenes.

    Returns:
        difference: mean over the C colours of attribute_spread(first) - attribute_spread(second)
        (negative: the first is more consistent); low, high: its 95% percentile interval.
    """

    def mean_difference(scenes: np.ndarray) -> float:
        drawn = torch.as_tensor(scenes.astype(np.int64))
        return float(
            np.mean(
                [
                    attribute_spread(a[drawn]) - attribute_spread(b[drawn])
                    for a, b in zip(first, second, strict=True)
                ]
            )
        )

    scenes = np.arange(first.shape[1])
    interval = stats.bootstrap(
        (scenes,), mean_difference, n_resamples=draws, vectorized=False, method="percentile", rng=seed
    ).confidence_interval
    return {
        "difference": round(mean_difference(scenes), 4),
        "low": round(float(interval.low), 4),
        "high": round(float(interval.high), 4),
    }


def style_readings(
    model,
    oracle,
    encoder: ZipEncoder,
    scenes,
    sources: torch.Tensor,
    start: torch.Tensor,
    plain: torch.Tensor,
    settings,
    args,
) -> dict:
    """The `style` reading of the module docstring; `plain` holds the text-only word swap's edits."""
    attribute, value = encoder.config["data"]["attribute"], encoder.config["data"]["value"]
    truths = {color: styled_truths(scenes, attribute, value, color) for color in generator.COLORS}
    per_color, colors_read = {}, {}
    for color in generator.COLORS:
        code = zip_reference_code(model, encoder, user_reference(color))
        edits = {
            "zip_user_reference": generate_with_zip(model, start, encoder, code, 1.0, settings),
            "text_only_direct_p2p": plain,
            "text_only_color_named": text_only_edits(
                model, scenes, attribute, value, args.text_steps, also={STYLE: color}
            ),
        }
        per_color[color] = {
            method: styled(oracle, edited, attribute, value, color, sources, truths[color], scenes)
            for method, edited in edits.items()
        }
        colors_read[color] = {
            method: oracle_readings(oracle, edited)[1][STYLE] for method, edited in edits.items()
        }
    mean = {
        method: {
            key: round(float(np.mean([per_color[color][method][key] for color in per_color])), 4)
            for key in (
                "followed",
                "success",
                "faithful_sized_success",
                "color_probability_std",
                "color_spread",
            )
        }
        for method in per_color["red"]
    }
    by_method = {
        method: torch.stack([colors_read[color][method] for color in colors_read]) for method in mean
    }
    difference = {
        f"zip_minus_{name}": spread_difference_interval(by_method["zip_user_reference"], by_method[method])
        for name, method in (("plain_swap", "text_only_direct_p2p"), ("named_swap", "text_only_color_named"))
    }
    reference_names, _ = oracle_readings(oracle, encoder.reference_images)
    own = {}
    for index, color in enumerate(reference_names[STYLE]):
        if color not in own:  # the first of the encoder's references the oracle reads in each colour
            code = zip_reference_code(model, encoder, encoder.reference_images[index])
            edited = generate_with_zip(model, start, encoder, code, 1.0, settings)
            reading = styled(oracle, edited, attribute, value, color, sources, truths[color], scenes)
            own[color] = {key: reading[key] for key in ("followed", "color_probability_mean")}
    return {
        "per_user_reference_color": per_color,
        "mean_over_colors": mean,
        "color_spread_difference": difference,
        "own_references_followed": own,
    }


def evaluate(model, oracle, encoder: ZipEncoder, scenes, settings: EditSettings, args) -> tuple[dict, dict]:
    attribute, value = encoder.config["data"]["attribute"], encoder.config["data"]["value"]
    images = torch.as_tensor(np.stack([generator.render(scene).image for scene in scenes]))
    truths = torch.as_tensor(
        np.stack([generator.counterfactual(scene, attribute, value).image for scene in scenes])
    )
    before = model_fingerprint(model)
    started = time.perf_counter()
    with torch.no_grad():
        start = forward_to_return_step(model, images, settings)
    forward_seconds = time.perf_counter() - started
    own_code = zip_reference_code(model, encoder, None)
    started = time.perf_counter()
    edited = generate_with_zip(model, start, encoder, own_code, 1.0, settings)
    generate_seconds = time.perf_counter() - started
    names, probabilities = oracle_readings(oracle, edited)
    kept = {
        f"kept_{head}": float(
            np.mean([n == _value(s, head) for n, s in zip(names[head], scenes, strict=True)])
        )
        for head in HEADS
        if head != attribute
    }
    curve = []
    for scale in args.scales:
        scaled = generate_with_zip(model, start, encoder, own_code, scale, settings)
        _, scaled_probabilities = oracle_readings(oracle, scaled)
        curve.append(round(float(_target_probability(scaled_probabilities, attribute, value).mean()), 4))
    user_reference = torch.as_tensor(generator.render(USER_REFERENCE).image)
    user_code = zip_reference_code(model, encoder, user_reference)
    with_user = generate_with_zip(model, start, encoder, user_code, 1.0, settings)
    second_code = zip_reference_code(model, encoder, encoder.reference_images[1])
    with_second = generate_with_zip(model, start, encoder, second_code, 1.0, settings)
    text_only = text_only_edits(model, scenes, attribute, value, args.text_steps)
    style = style_readings(model, oracle, encoder, scenes, images, start, text_only, settings, args)
    after = model_fingerprint(model)
    pixels = lambda a, b: float((a.float() - b.float()).abs().mean())  # noqa: E731
    own_reference = spread(oracle, edited, attribute, value, images, truths, scenes)
    report = {
        f"{attribute}->{value}": {  # the own-reference edit's reading, less its spread
            **{key: got for key, got in own_reference.items() if not key.startswith("target_probability")},
            **kept,
            "transition_scales": list(args.scales),
            "transition_target_probability": curve,
            "transition_monotonic": all(b >= a for a, b in zip(curve, curve[1:], strict=False)),
        },
        "frozen": {
            "before": before[:16],
            "after": after[:16],
            "trained_on": load_manifest_fingerprint(encoder)[:16],
            "unchanged": before == after == load_manifest_fingerprint(encoder),
        },
        "consistency": {
            "zip_user_reference": spread(oracle, with_user, attribute, value, images, truths, scenes),
            "zip_own_reference": own_reference,
            "text_only_direct_p2p": spread(oracle, text_only, attribute, value, images, truths, scenes),
        },
        "references": {
            "edit_vs_source_pixels": round(pixels(edited, images), 2),
            "edit_first_vs_second_reference_pixels": round(pixels(edited, with_second), 2),
            "edit_own_vs_user_reference_pixels": round(pixels(edited, with_user), 2),
        },
        "style": style,
        "seconds_per_image": {
            "forward": round(forward_seconds / len(scenes), 3),
            "generate": round(generate_seconds / len(scenes), 3),
        },
    }
    strips = {
        "source": images,
        "zip (own reference)": edited,
        "zip (user reference)": with_user,
        "text only (P2P)": text_only,
    }
    references = {"own": encoder.reference_images[0], "user": user_reference}
    return report, {"strips": strips, "references": references}


def load_manifest_fingerprint(encoder: ZipEncoder) -> str:
    from pipeline.training.artefact import read_manifest

    return read_manifest(encoder.uri)["base_model_fingerprint"]


def save_strip(examples: dict, path: Path, count: int = 8) -> None:
    """A PNG: one row per kind of image, `count` scenes, plus the two references at the left."""
    from PIL import Image

    rows = []
    for name, images in examples["strips"].items():
        reference = examples["references"]["user" if "user" in name else "own"].numpy()
        blank = np.full_like(reference, 255) if name in ("source", "text only (P2P)") else reference
        rows.append(np.concatenate([blank, *images[:count].numpy()], axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).resize(
        (rows[0].shape[1] * 2, len(rows) * rows[0].shape[0] * 2), Image.NEAREST
    ).save(path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("encoder", help="artefact URI of a ZIP encoder")
    parser.add_argument("--model", default="pipeline/world/assets/shapes-sd")
    parser.add_argument("--scenes", type=int, default=32)
    parser.add_argument("--forward-steps", type=int, default=None, help="S_for (default: the encoder's)")
    parser.add_argument("--generative-steps", type=int, default=None, help="S_gen (default: the encoder's)")
    parser.add_argument("--scales", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--text-steps", type=int, default=50, help="DDIM steps of the text-only baseline")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--write",
        nargs="?",
        const="zip_world",
        default=None,
        metavar="NAME",
        help="write benchmarks/results/NAME.{json,png} (NAME: zip_world)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_diffusion_model(args.model)
    oracle = load_oracle()
    encoder = load_editor(model, args.encoder)
    if not isinstance(encoder, ZipEncoder):
        parser.error(f"{args.encoder} is not a ZIP encoder artefact")
    settings = EditSettings.of(
        encoder, forward_steps=args.forward_steps, generative_steps=args.generative_steps
    )
    pair = (encoder.config["data"]["attribute"], encoder.config["data"]["value"])
    scenes = heldout_scenes(args.scenes, [pair])
    report, examples = evaluate(model, oracle, encoder, scenes, settings, args)
    results = {
        "setup": f"{args.scenes} held-out one-object scenes, {settings}, zip_step={encoder.config['zip_step']}",
        "encoder": {"uri": encoder.uri, "version": encoder.version[:16], "train": encoder.config["data"]},
        **report,
    }
    print(json.dumps(results, indent=1), flush=True)
    if args.write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{args.write}.json").write_text(json.dumps(results, indent=1) + "\n")
        save_strip(examples, RESULTS / f"{args.write}.png")
    return results


if __name__ == "__main__":
    main()
