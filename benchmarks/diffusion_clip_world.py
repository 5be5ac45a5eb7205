"""DiffusionCLIP editors on held-out shapes-world scenes, judged by the oracle (evaluation only).

    python -m benchmarks.diffusion_clip_world out/editors/star/artefact [out/editors/blue/artefact] \
        [--scenes 32] [--forward-steps 200] [--generative-steps 40] [--gammas 0 0.25 0.5 0.75 1] \
        [--weights 0.7,0.3 ...] [--handovers 300 ...] [--combination-only] [--combination conjunction] \
        [--output benchmarks/results/NAME.json]

For held-out one-object scenes (seeds from HELDOUT_SEED_OFFSET, disjoint from training) whose
attribute does not already have the editor's value, each editor edits every scene (gamma = 1) and
the oracle reads the result. Reported per editor:

- success: fraction the oracle reads as the target value; kept_*: fraction whose other attributes
  the oracle still reads as the source's.
- Against the world's ground truth (the scene rendered with the attribute changed): closer_than_source,
  the fraction of edits nearer to it (pixel MSE) than the unedited source is; faithful_success, the
  fraction the oracle reads as the target that are also closer; gt_psnr_db and source_gt_psnr_db, the
  mean PSNR of the edits and of the sources against it. The oracle alone can be fooled: it was trained
  on clean renders, and it reads broken, fragmented objects as stars; a fragment is not nearer to the
  true star than the source is, a drawn star is (Prompt-to-Prompt's word swap: 0.84 of its edits).
- Shape edits also: sized_success and faithful_sized_success, the same with the edit's object keeping
  at least SIZE_KEPT of the truth's area required too (`with_size_reading`). The oracle never saw objects
  smaller than the world's (radius 10-20 px) and reads most of them as stars; a shrunken blob nearer the
  truth than the source passes faithful_success but not this (`transition_faithful_sized_success` per
  gamma; `all_drawn_sized_success` for combinations with a shape editor).
- transition: mean oracle probability of the target value at each gamma of the continuous transition
  (original model 1 - gamma, editor gamma), whether it rises monotonically (over every gamma, and over
  the interpolation gamma <= 1 alone: `transition_monotonic_to_1`), and the success at each gamma
  (`transition_success`); each scene's probability (`transition_target_probability_by_scene`) and,
  per step between consecutive gammas, the paired bootstrap 95% interval of the mean's change
  (`transition_step_intervals`): a step whose interval lies below 0 falls beyond the choice of scenes.
With two editors, on the scenes that have neither value: both_success, the fraction the oracle reads
with both values (all_faithful_success: and nearer than the source to the scene with both changed;
all_drawn_success: and, for each editor, nearer that scene than every rendering lacking the editor's
value (the source, the scene with only the other editors' values) is, on the pixels where that
rendering differs from it: a blue circle is not a blue star; `drawn` gives each editor's share
alone, `attribute_drawn`)
under the noise combination gamma = (0.5, 0.5) (eq. 14), and with `--handovers T ...` under the
piecewise-constant gamma_i(t) of each handover T: the first editor alone on the steps with
t >= T, the second alone below (`combination_handover`), and with `--weights g1,g2 ...` under each
other constant weighting (`combination_weights`; eq. 14 allows any sum <= 1, the original model
taking the rest). `--combination-only` skips the single-editor readings; `--word-swap-steps S` adds,
per editor, the same readings of direct inversion + Prompt-to-Prompt word swap to the counterfactual
caption (S steps). `--combination conjunction` combines every weighting as
eps + sum_i gamma_i (eps_i - eps) with any gammas >= 0 (the same weighted sum with the original's share
1 - sum allowed below 0), and so also takes transition gammas above 1.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.editors import EditSettings, forward_to_return_step, generate_with_editors, load_editor
from pipeline.metrics import pixel
from pipeline.models.loading import load_diffusion_model
from pipeline.training.world_data import HELDOUT_SEED_OFFSET
from pipeline.world import generator
from pipeline.world.oracle import HEADS, images_to_tensor, load_oracle


def heldout_scenes(count: int, avoid: list[tuple[str, str]]) -> list[generator.Scene]:
    """`count` held-out one-object scenes having none of the (attribute, value) pairs in `avoid`."""
    scenes, seed = [], HELDOUT_SEED_OFFSET
    while len(scenes) < count:
        scene = generator.sample_scene(seed, two_object_fraction=0.0)
        seed += 1
        if not any(_value(scene, attribute) == value for attribute, value in avoid):
            scenes.append(scene)
    return scenes


def _value(scene: generator.Scene, attribute: str) -> str:
    return scene.background if attribute == "background" else getattr(scene.objects[0], attribute)


def oracle_readings(oracle, images: torch.Tensor) -> tuple[dict[str, list[str]], dict[str, torch.Tensor]]:
    """(predicted names per head, softmax probabilities per head) of uint8 images (B, H, W, 3)."""
    with torch.no_grad():
        logits = oracle(images_to_tensor(images))
    names = {head: [HEADS[head][i] for i in logits[head].argmax(1).tolist()] for head in HEADS}
    return names, {head: logits[head].softmax(1) for head in HEADS}


def truth_checks(edited: torch.Tensor, sources: torch.Tensor, truths: torch.Tensor) -> dict[str, np.ndarray]:
    """Each edit against the world's ground-truth edit of its source.

    Args:
        edited, sources, truths: uint8 (B, H, W, 3): the edits, their sources, and the sources rendered
            with the edit's attribute values (`generator.counterfactual`).

    Returns:
        closer: bool (B,), the edit's pixel MSE to the truth below the source's (an unchanged image is
        not closer); gt_psnr_db and source_gt_psnr_db: float (B,), PSNR in dB against the truth.
    """

    def unit(images: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(images).permute(0, 3, 1, 2).double() / 255.0

    edit_error = pixel.mse(unit(edited), unit(truths))
    source_error = pixel.mse(unit(sources), unit(truths))
    return {
        "closer": (edit_error < source_error).numpy(),
        "gt_psnr_db": (10.0 * torch.log10(1.0 / edit_error)).numpy(),
        "source_gt_psnr_db": (10.0 * torch.log10(1.0 / source_error)).numpy(),
    }


def attribute_drawn(edited: torch.Tensor, truths: torch.Tensor, lacking: list[torch.Tensor]) -> np.ndarray:
    """Whether each edit drew one attribute of a multi-attribute truth, not only the others.

    The whole-image check (`truth_checks`) cannot tell a blue circle from a blue star when the truth
    is a blue star: recolouring the object alone brings the image nearer. Here the edit is compared
    with each rendering of the scene that lacks the attribute (the source, and the truth without it),
    on the pixels where that rendering differs from the truth: the edit must be nearer the truth there
    than the rendering is, for every one of them.

    Args:
        edited, truths: uint8 (B, H, W, 3): the edits and the scenes rendered with every edited attribute.
        lacking: uint8 (B, H, W, 3) each: the scenes rendered with some of the other attributes edited
            but not this one.

    Returns:
        bool (B,); False where a rendering lacking the attribute equals the truth (nothing to draw).
    """
    edited, truths = torch.as_tensor(edited).double(), torch.as_tensor(truths).double()
    drawn = torch.ones(len(truths), dtype=torch.bool)
    for rendering in lacking:
        rendering = torch.as_tensor(rendering).double()
        region = (truths != rendering).any(dim=-1, keepdim=True).double()  # (B, H, W, 1)
        # summed, not averaged: both errors cover the same region
        edit_error = (((edited - truths) ** 2) * region).sum(dim=(1, 2, 3))
        rendering_error = (((rendering - truths) ** 2) * region).sum(dim=(1, 2, 3))
        drawn &= edit_error < rendering_error
    return drawn.numpy()


# A pixel belongs to the object where it differs from the scene's own background by more than this many
# grey levels in some channel: every object colour lies >= 65 levels from any background grey (purple on
# a grey of 115), and the model's reconstructions stay within it off the object.
SILHOUETTE_LEVELS = 48


def silhouettes(images: torch.Tensor, scenes) -> torch.Tensor:
    """Each image's object pixels against its scene's background, opened by a 3x3 square (which drops
    the one-pixel seams a reconstruction leaves along stripes and checks); bool (B, H, W)."""
    backgrounds = np.stack([generator.background_image(scene.background, scene.seed) for scene in scenes])
    difference = (torch.as_tensor(images).int() - torch.as_tensor(backgrounds).int()).abs().amax(dim=-1)
    masks = (difference > SILHOUETTE_LEVELS).float()[:, None]
    eroded = 1.0 - torch.nn.functional.max_pool2d(1.0 - masks, 3, stride=1, padding=1)
    return torch.nn.functional.max_pool2d(eroded, 3, stride=1, padding=1)[:, 0].bool()


# The oracle never saw objects smaller than the world draws (radius 10-20 px alone) and reads most of
# them as stars, rendered or decoded by the VAE (`benchmarks/oracle_sizes.py`), so an edit that shrinks
# its object to a blob nearer the truth than the source passes for a faithful star. A shape edit keeps
# its object's size when the object's area (`silhouettes`) is at least SIZE_KEPT of the ground truth's
# (a star at 0.77 of the truth's radius): the VAE's own reconstructions of 256 held-out true stars keep
# at least 0.79 of it, and the word swap's stars of the star benchmark's 32 scenes at least 0.68.
SIZE_KEPT = 0.6


def object_areas(images: torch.Tensor, scenes) -> torch.Tensor:
    """The object's area in pixels of each image (`silhouettes` against its scene's background); (B,)."""
    return silhouettes(images, scenes).sum(dim=(1, 2))


def with_size_reading(
    checks: dict[str, np.ndarray], attribute: str, edited: torch.Tensor, truths: torch.Tensor, scenes
) -> dict[str, np.ndarray]:
    """`checks` with "size_kept" (the edit's object area at least SIZE_KEPT of the truth's, bool (B,))
    when the edit is a shape's; `edited` and `truths` uint8 (B, H, W, 3) of `scenes`."""
    if attribute != "shape":
        return checks
    kept = object_areas(edited, scenes) >= SIZE_KEPT * object_areas(truths, scenes)
    return {**checks, "size_kept": kept.numpy()}


def judged(
    edited: torch.Tensor, sources: torch.Tensor, truths: torch.Tensor, attribute: str, scenes
) -> dict[str, np.ndarray]:
    """`truth_checks` of edits of one attribute, with the size reading for a shape's (`with_size_reading`)."""
    return with_size_reading(truth_checks(edited, sources, truths), attribute, edited, truths, scenes)


def truth_summary(hits: np.ndarray, checks: dict[str, np.ndarray]) -> dict[str, float]:
    """faithful_success (oracle hit and closer), closer_than_source and the mean PSNRs, rounded; with a
    size reading in `checks` (`with_size_reading`), sized_success (oracle hit and the object's size kept)
    and faithful_sized_success (and closer)."""
    summary = {
        "faithful_success": float(np.mean(hits & checks["closer"])),
        "closer_than_source": float(np.mean(checks["closer"])),
        "gt_psnr_db": round(float(np.mean(checks["gt_psnr_db"])), 2),
        "source_gt_psnr_db": round(float(np.mean(checks["source_gt_psnr_db"])), 2),
    }
    if "size_kept" in checks:  # shape edits (`with_size_reading`)
        summary["sized_success"] = float(np.mean(hits & checks["size_kept"]))
        summary["faithful_sized_success"] = float(np.mean(hits & checks["closer"] & checks["size_kept"]))
    return summary


def renders(scenes) -> torch.Tensor:
    """The scenes rendered, uint8 (B, H, W, 3)."""
    return torch.as_tensor(np.stack([generator.render(scene).image for scene in scenes]))


def sources_and_truths(scenes, attribute: str, value: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The scenes rendered and rendered with `attribute` changed to `value`, uint8 (B, H, W, 3) each."""
    images = renders(scenes)
    truths = torch.as_tensor(
        np.stack([generator.counterfactual(scene, attribute, value).image for scene in scenes])
    )
    return images, truths


def text_only_edits(
    model, scenes, attribute: str, value: str, steps: int, also: dict[str, str] | None = None
) -> torch.Tensor:
    """Direct inversion + P2P word swap of every scene to its counterfactual caption; (B, H, W, 3) uint8.

    `also` names further attributes the target caption changes (e.g. {"color": "red"}: "a red star").
    """
    from pipeline.engine import AttentionControl, EditRequest, InversionConfig, edit, invert

    sources = [generator.render(scene) for scene in scenes]
    changes = {**(also or {}), attribute: value}
    targets = [generator.caption_for(edited_scene(scene, changes)) for scene in scenes]
    images = torch.as_tensor(np.stack([source.image for source in sources]))
    config = InversionConfig.of("direct", num_steps=steps, guidance_scale=7.5)
    inversion = invert(model, images, [source.caption for source in sources], config)
    control = AttentionControl("replace", cross_replace_steps=0.8, self_replace_steps=0.4)
    results = edit(model, inversion, [EditRequest(i, target, control) for i, target in enumerate(targets)])
    return torch.stack([torch.as_tensor(result.image) for result in results])


def edited_scene(scene, changes: dict[str, str]):
    """The scene with every (attribute, value) of `changes` applied to its primary object (or background)."""
    for attribute, value in changes.items():
        scene = generator.edit_scene(scene, attribute, value)
    return scene


def rises(curve: list[float]) -> bool:
    """Whether the curve never falls (ties allowed)."""
    return all(later >= earlier for earlier, later in zip(curve, curve[1:], strict=False))


def target_probabilities(probabilities: dict[str, torch.Tensor], attribute: str, value: str) -> np.ndarray:
    """The oracle's probability of `value` on the `attribute` head for each image, float (B,)."""
    return probabilities[attribute][:, HEADS[attribute].index(value)].double().numpy()


def mean_target_probability(probabilities: dict[str, torch.Tensor], attribute: str, value: str) -> float:
    """The oracle's mean probability of `value` on the `attribute` head, to 4 places."""
    return round(float(target_probabilities(probabilities, attribute, value).mean()), 4)


def step_intervals(
    per_scene: np.ndarray, draws: int = 10_000, level: float = 0.95, seed: int = 0
) -> list[list[float]]:
    """Paired bootstrap intervals of the change of the mean between consecutive gammas.

    The scenes are resampled with replacement, the same draw for every gamma (each scene is edited at
    every gamma), so that an interval below 0 is a fall of the curve beyond the choice of scenes.

    Args:
        per_scene: a reading of every scene at every gamma, float (G, B).
        draws: bootstrap resamples.
        level: the central probability of each interval.
        seed: seeds the resampling.

    Returns:
        G - 1 pairs [low, high], to 4 places: the interval of mean(per_scene[g + 1] - per_scene[g]).
    """
    changes = np.diff(np.asarray(per_scene, np.float64), axis=0)  # (G - 1, B)
    picks = np.random.default_rng(seed).integers(0, changes.shape[1], size=(draws, changes.shape[1]))
    means = changes[:, picks].mean(axis=-1)  # (G - 1, draws)
    tail = (1.0 - level) / 2.0
    bounds = np.quantile(means, [tail, 1.0 - tail], axis=-1).T  # (G - 1, 2)
    return [[round(float(low), 4), round(float(high), 4)] for low, high in bounds]


def evaluate(
    model,
    oracle,
    editors,
    scenes,
    settings: EditSettings,
    gammas: list[float],
    combination: str = "convex",
    success_gamma: float = 1.0,
    strips: dict[str, list[np.ndarray]] | None = None,
) -> dict[str, dict]:
    """Success and kept attributes at `success_gamma`, and the transition curve, of each editor on `scenes`;
    `strips` (when given) receives per editor the rows source, ground truth, and the edit at each gamma,
    uint8 (B, H, W, 3) each."""
    started = time.perf_counter()
    start = combination_start(model, scenes, settings)
    report = {"forward_seconds": round(time.perf_counter() - started, 1)}
    for editor in editors:
        attribute, value = editor.config["data"]["attribute"], editor.config["data"]["value"]
        images, truths = sources_and_truths(scenes, attribute, value)
        curve, by_scene, hits, faithful, sized, success_edit = [], [], [], [], [], None
        rows = [images.numpy(), truths.numpy()]
        for gamma in gammas:
            edited = generate_with_editors(model, start, [editor], [gamma], settings, combination=combination)
            names, probabilities = oracle_readings(oracle, edited)
            hit = np.array([name == value for name in names[attribute]])
            by_scene.append(target_probabilities(probabilities, attribute, value))
            curve.append(mean_target_probability(probabilities, attribute, value))
            checks = judged(edited, images, truths, attribute, scenes)
            hits.append(float(hit.mean()))
            faithful.append(float(np.mean(hit & checks["closer"])))
            if "size_kept" in checks:
                sized.append(float(np.mean(hit & checks["closer"] & checks["size_kept"])))
            rows.append(edited.numpy())
            if gamma == success_gamma:  # the success reading is this one: not generated again
                success_edit = (names, checks)
        if success_edit is None:
            edited = generate_with_editors(
                model, start, [editor], [success_gamma], settings, combination=combination
            )
            success_edit = (
                oracle_readings(oracle, edited)[0],
                judged(edited, images, truths, attribute, scenes),
            )
        names, checks = success_edit
        if strips is not None:
            strips[f"{attribute}-{value}"] = rows
        hit = np.array([name == value for name in names[attribute]])
        kept = {
            f"kept_{head}": float(
                np.mean([n == _value(s, head) for n, s in zip(names[head], scenes, strict=True)])
            )
            for head in HEADS
            if head != attribute
        }
        report[f"{attribute}->{value}"] = {
            "success": float(hit.mean()),
            **({"success_gamma": success_gamma} if success_gamma != 1.0 else {}),
            **truth_summary(hit, checks),
            **kept,
            "transition_gammas": gammas,
            "transition_target_probability": curve,
            "transition_monotonic": rises(curve),
            "transition_monotonic_to_1": rises([p for p, g in zip(curve, gammas, strict=True) if g <= 1.0]),
            "transition_target_probability_by_scene": [[round(float(p), 4) for p in row] for row in by_scene],
            "transition_step_intervals": step_intervals(np.stack(by_scene)),
            "transition_success": hits,
            "transition_faithful_success": faithful,
            **({"transition_faithful_sized_success": sized} if sized else {}),
        }
    return report


def word_swap_reading(model, oracle, scenes, attribute: str, value: str, steps: int) -> dict[str, float]:
    """The same readings for text-only editing of the same scenes (`text_only_edits`): a reference for
    what the model itself draws when asked for the value."""
    images, truths = sources_and_truths(scenes, attribute, value)
    edited = text_only_edits(model, scenes, attribute, value, steps)
    names, _ = oracle_readings(oracle, edited)
    hit = np.array([name == value for name in names[attribute]])
    checks = judged(edited, images, truths, attribute, scenes)
    return {"success": float(hit.mean()), **truth_summary(hit, checks)}


def save_strip(rows: list[np.ndarray], path: str, count: int = 12) -> None:
    """A PNG at twice the size: one row of `count` scenes per entry of `rows` (uint8 (B, H, W, 3) each)."""
    from PIL import Image

    grid = np.concatenate([np.concatenate(list(row[:count]), axis=1) for row in rows], axis=0)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(path)


def combination_start(model, scenes, settings: EditSettings) -> torch.Tensor:
    """x_t0 of the combination's scenes, shared by every weighting of the editors."""
    images = renders(scenes)
    with torch.no_grad():
        return forward_to_return_step(model, images, settings)


def truth_scenes_of(scenes, edits: list[dict]) -> list[generator.Scene]:
    """The scenes with every edit's {attribute, value} applied (object 0), in order."""
    truth_scenes = list(scenes)
    for data in edits:
        truth_scenes = [generator.edit_scene(s, data["attribute"], data["value"]) for s in truth_scenes]
    return truth_scenes


def renderings_by_subset(scenes, edits: list[dict]) -> dict[tuple[int, ...], torch.Tensor]:
    """The scenes rendered with each subset of `edits` applied, uint8 (B, H, W, 3) each.

    Keyed by the subset's indices in increasing order, subsets by increasing size: () holds the sources
    and (0, ..., n - 1) the truths of the whole combination.
    """
    return {
        subset: renders(truth_scenes_of(scenes, [edits[index] for index in subset]))
        for size in range(len(edits) + 1)
        for subset in itertools.combinations(range(len(edits)), size)
    }


def evaluate_combination(
    model,
    oracle,
    editors,
    scenes,
    start: torch.Tensor,
    settings: EditSettings,
    handover: int | None = None,
    weights: list[float] | None = None,
    combination: str = "convex",
) -> dict:
    """Fraction of scenes the oracle reads with every editor's value under `weights` (eq. 14; equal
    weights when None), or, with `handover` T (two editors), with the first editor alone at t >= T
    and the second below."""
    if handover is None:
        gammas, windows = weights or [1.0 / len(editors)] * len(editors), None
    else:
        gammas, windows = [1.0, 1.0], [(handover, 10**9), (0, handover - 1)]
    edited = generate_with_editors(model, start, editors, gammas, settings, windows, combination)
    names, probabilities = oracle_readings(oracle, edited)
    # Every rendering the judges need, once: the sources, the truths, and what lacks each editor's value.
    table = renderings_by_subset(scenes, [editor.config["data"] for editor in editors])
    truths = table[tuple(range(len(editors)))]
    checks = truth_checks(edited, table[()], truths)
    for data in (editor.config["data"] for editor in editors):  # a shape editor's size read too
        checks = with_size_reading(checks, data["attribute"], edited, truths, scenes)
    per_editor, per_editor_probability, drawn = {}, {}, {}
    both = np.ones(len(scenes), dtype=bool)
    every_drawn = np.ones(len(scenes), dtype=bool)
    for index, editor in enumerate(editors):
        attribute, value = editor.config["data"]["attribute"], editor.config["data"]["value"]
        hit = np.array([name == value for name in names[attribute]])
        per_editor[f"{attribute}->{value}"] = float(hit.mean())
        per_editor_probability[f"{attribute}->{value}"] = mean_target_probability(
            probabilities, attribute, value
        )
        both &= hit
        lacking = [rendering for subset, rendering in table.items() if index not in subset]
        this_drawn = attribute_drawn(edited, truths, lacking)
        drawn[f"{attribute}->{value}"] = float(this_drawn.mean())
        every_drawn &= this_drawn
    truth = truth_summary(both, checks)
    return {
        "gammas": gammas,
        **({"windows": windows} if windows else {}),
        **({"combination": combination} if combination != "convex" else {}),
        "all_success": float(both.mean()),
        "all_faithful_success": truth.pop("faithful_success"),
        "all_drawn_success": float(np.mean(both & checks["closer"] & every_drawn)),
        **(
            {
                "all_drawn_sized_success": float(
                    np.mean(both & checks["closer"] & every_drawn & checks["size_kept"])
                )
            }
            if "size_kept" in checks
            else {}
        ),
        "drawn": drawn,
        **truth,
        "per_editor": per_editor,
        "per_editor_target_probability": per_editor_probability,
    }


def _weights(text: str) -> list[float]:
    """'0.7,0.3' -> [0.7, 0.3]; the sum is checked by the edit itself (eq. 14: at most 1)."""
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of weights") from None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("editors", nargs="+", help="artefact URIs of DiffusionCLIP editors")
    parser.add_argument("--model", default="pipeline/world/assets/shapes-sd")
    parser.add_argument("--scenes", type=int, default=32)
    parser.add_argument("--forward-steps", type=int, default=None, help="S_for (default: the editor's, 200)")
    parser.add_argument(
        "--generative-steps", type=int, default=None, help="S_gen (default: the editor's, 40)"
    )
    parser.add_argument("--gammas", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument(
        "--handovers",
        type=int,
        nargs="*",
        default=[],
        help="with two editors: timesteps T at which the first editor hands over to the second",
    )
    parser.add_argument(
        "--weights",
        type=_weights,
        nargs="*",
        default=[],
        help="further constant weightings of the editors' noise, one comma-separated list each",
    )
    parser.add_argument("--combination-only", action="store_true", help="skip the single-editor readings")
    parser.add_argument(
        "--combination",
        choices=["convex", "conjunction"],
        default="convex",
        help="how the editors' noises combine in every weighting (conjunction: gammas >= 0, any sum)",
    )
    parser.add_argument(
        "--success-gamma",
        type=float,
        default=1.0,
        help="the gamma at which each editor's success and kept attributes are read (above 1: conjunction)",
    )
    parser.add_argument(
        "--word-swap-steps",
        type=int,
        default=0,
        help="also read direct inversion + P2P word swap of each editor's scenes, with this many steps",
    )
    parser.add_argument(
        "--strip",
        default=None,
        help="write PREFIX_ATTRIBUTE-VALUE.png per editor: sources, ground truth, the edit at each gamma",
    )
    parser.add_argument("--output", default=None, help="also write the final readings to this JSON file")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.handovers and len(args.editors) != 2:
        parser.error("--handovers needs exactly two editors")
    if args.combination_only and len(args.editors) < 2:
        parser.error("--combination-only needs two editors or more")
    if any(len(weights) != len(args.editors) for weights in args.weights):
        parser.error(f"--weights: give one weight per editor ({len(args.editors)}), e.g. 0.7,0.3")
    torch.set_num_threads(args.threads)
    model = load_diffusion_model(args.model)
    oracle = load_oracle()
    editors = [load_editor(model, uri) for uri in args.editors]
    settings = EditSettings.of(
        editors[0], forward_steps=args.forward_steps, generative_steps=args.generative_steps
    )
    results = {"setup": f"{args.scenes} held-out one-object scenes per editor, {settings}"}
    strips: dict[str, list[np.ndarray]] = {}
    for editor in [] if args.combination_only else editors:
        pair = (editor.config["data"]["attribute"], editor.config["data"]["value"])
        scenes = heldout_scenes(args.scenes, [pair])
        results.update(
            evaluate(
                model,
                oracle,
                [editor],
                scenes,
                settings,
                args.gammas,
                args.combination,
                args.success_gamma,
                strips,
            )
        )
        if args.word_swap_steps:
            results[f"{pair[0]}->{pair[1]} word swap"] = word_swap_reading(
                model, oracle, scenes, *pair, args.word_swap_steps
            )
        print(json.dumps(results, indent=1), flush=True)
    if len(editors) > 1:
        pairs = [(e.config["data"]["attribute"], e.config["data"]["value"]) for e in editors]
        scenes = heldout_scenes(args.scenes, pairs)
        start = combination_start(model, scenes, settings)
        results["combination"] = evaluate_combination(
            model, oracle, editors, scenes, start, settings, combination=args.combination
        )
        results["combination_handover"] = {
            str(handover): evaluate_combination(model, oracle, editors, scenes, start, settings, handover)
            for handover in args.handovers
        }
        results["combination_weights"] = {
            ",".join(f"{weight:g}" for weight in weights): evaluate_combination(
                model, oracle, editors, scenes, start, settings, weights=weights, combination=args.combination
            )
            for weights in args.weights
        }
    for name, rows in strips.items() if args.strip else ():
        save_strip(rows, f"{args.strip}_{name}.png")
    print(json.dumps(results, indent=1), flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
