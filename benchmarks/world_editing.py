"""Every inversion method x every editing method on the shapes world, against ground-truth edits.

    python -m benchmarks.world_editing [--scenes 8] [--steps 20] [--guidance 7.5] [--learning-rates 0.05]
        [--methods ...] [--editors P2P P2Plus none] [--write] [--readme]
    python -m benchmarks.world_editing --render-only   # README section from the stored JSON

For held-out one-object scenes (seeds disjoint from training), every inversion method of the registry
(`pipeline.methods.method_names()`, so a method registered later gets its rows) inverts each scene with
its caption at guidance w; each editing method then edits the primary object's shape towards the
target caption (one word differs):

- P2P: Prompt-to-Prompt word swap (replace, tau_c 0.8, tau_s 0.4).
- P2Plus: P2P plus the unconditional branch's self-attention injection (StyleDiffusion §3.4,
  tau_u 0.5 as in its Fig. 8).
- none: no attention control: the inverted noise regenerated with the target prompt (mode none).
A combination the engine refuses is skipped, and the reason printed and recorded under "skipped".

Reported per (inversion, editor) row, means over scenes (a PSNR of a bit-identical region, +inf, and an
undefined value are left out of its mean):

- recon_psnr_db / recon_ssim: the method's reconstruction vs the source (one per inversion); the
  "vae" row, decode(encode(x)), is the ceiling.
- edit_success: fraction of edits the oracle reads as the target shape with the source's colour and
  background (its parts: oracle_target_shape, oracle_kept_color, oracle_kept_background).
- gt_psnr_db / gt_psnr_changed_db / gt_psnr_unchanged_db: edited image vs the counterfactual render
  (the ground-truth edit), overall, inside the region R the edit should change, and outside it.
- bg_psnr_db / bg_ssim / bg_mse / bg_lpips: edited image vs the source outside R (the score stage's
  background metrics with the ground-truth region; bg_lpips is NS-LPIPS with the world's backbone,
  the oracle's feature maps). For a shape edit the counterfactual equals the source outside R, so
  bg_psnr_db equals gt_psnr_unchanged_db.
- structure_dist_x1e3: structure distance of the edit to its source (self-similarity of the shapes
  CLIP vision tower's patch tokens), x 1e3.
- invert_seconds_per_image / edit_seconds_per_image: wall time per image of the batched call.
- pti_table_2_rows: reconstruction of DDIM, NTI and PTI in PTI's Table 2 setting (DDIM forward at
  w = 0, NTI and PTI with N = 5 and beta = 0.01, the source caption, the whole schedule).
Each method runs with its paper's defaults (the registry's). A larger learning rate for the methods
that optimise with one (rows "METHOD (lr X)") lands closer to the pivots, so reconstruction improves,
but the optimised embedding then carries the image and the word swap edits less.

Writes benchmarks/results/world_editing.json and .png; --write stores the table under "editing" in
assets/benchmark_metrics.json and rewrites MODEL_CARD.md; --readme rewrites the README section
between the world_editing markers from the JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.engine import (
    AttentionControl,
    EditRequest,
    EditResult,
    EngineInputError,
    InversionConfig,
    InversionResult,
    decode_latents,
    edit,
    encode_images,
    invert,
)
from pipeline.methods import get_method, method_names
from pipeline.metrics.perceptual import PerceptualDistance
from pipeline.metrics.pixel import mse, psnr, ssim
from pipeline.metrics.structure import patch_tokens, structure_distance
from pipeline.world.groundtruth import GroundTruthEdit, edit_error

OPTIMISED_METHODS = ("null_text", "prompt_tuning")  # the methods whose inner loop uses the learning rate
P2PLUS_TAU_U = 0.5  # StyleDiffusion Fig. 8: tau_u = 0.5 edits where P2P alone does not
EDITORS: dict[str, AttentionControl] = {
    "P2P": AttentionControl("replace", cross_replace_steps=0.8, self_replace_steps=0.4),
    "P2Plus": AttentionControl(
        "replace",
        cross_replace_steps=0.8,
        self_replace_steps=0.4,
        unconditional_self_replace_steps=P2PLUS_TAU_U,
    ),
    "none": AttentionControl("none"),
}
VAE_ROW = "vae"
RESULTS = Path(__file__).parent / "results"
README = Path(__file__).parents[1] / "README.md"
README_BEGIN = "<!-- world_editing:begin (written by python -m benchmarks.world_editing --readme) -->"
README_END = "<!-- world_editing:end -->"
OUTPUT_FLAGS = ("--write", "--readme", "--render-only")


@dataclass(frozen=True)
class Scorers:
    """What judges the edits.

    Attributes:
        oracle: `.predict(images (B, 3, H, W) in [-1, 1]) -> {"shape", "color", "background": names}`.
        perceptual: NS-LPIPS distance (bg_lpips), or None to leave it out.
        structure_tokens: images (B, 3, H, W) in [0, 1] -> ViT tokens, CLS first; None leaves the
            structure distance out.
    """

    oracle: Callable | object
    perceptual: PerceptualDistance | None = None
    structure_tokens: Callable[[torch.Tensor], torch.Tensor] | None = None


def _unit(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float64 in [0, 1]."""
    return torch.as_tensor(images).permute(0, 3, 1, 2).double() / 255.0


def _mean(values: torch.Tensor | list[float]) -> float:
    """Mean of the finite values; +inf when every value is +inf (bit-identical), NaN when none is defined."""
    values = torch.as_tensor(values, dtype=torch.float64)
    finite = values[torch.isfinite(values)]
    if len(finite):
        return float(finite.mean())
    return float("inf") if len(values) and bool((values == float("inf")).all()) else float("nan")


def source_images(edits: list[GroundTruthEdit]) -> torch.Tensor:
    return torch.as_tensor(np.stack([case.source.image for case in edits]))


def reconstruction_scores(reconstructions: torch.Tensor, images: torch.Tensor) -> dict[str, float]:
    """recon_psnr_db and recon_ssim of (B, H, W, 3) uint8 reconstructions against their sources."""
    return {
        "recon_psnr_db": _mean(psnr(_unit(reconstructions), _unit(images))),
        "recon_ssim": _mean(ssim(_unit(reconstructions), _unit(images))),
    }


def vae_row(model, edits: list[GroundTruthEdit], fit_steps: int = 0) -> dict:
    """The reconstruction ceiling: decode(encode(x)) of every source.

    With `fit_steps` K > 0, the row "vae (fit K)": the latents the engine inverts under
    `encoder_fit_steps: K` (E(x) refined by K Adam steps on the decoder's error), decoded.
    """
    images = source_images(edits)
    started = time.perf_counter()
    with torch.no_grad():
        reconstructions = decode_latents(model, encode_images(model, images, fit_steps))
    seconds = time.perf_counter() - started
    name = VAE_ROW if not fit_steps else f"{VAE_ROW} (fit {fit_steps})"
    row = {"inversion": name, "editor": None} | reconstruction_scores(reconstructions, images)
    return row | ({"encode_seconds_per_image": seconds / len(edits)} if fit_steps else {})


def score_edits(edited: torch.Tensor, edits: list[GroundTruthEdit], scorers: Scorers) -> dict[str, float]:
    """Edit metrics of (B, H, W, 3) uint8 edits of `edits`, means over the B scenes.

    The background is everything outside the ground-truth changed region R.
    """
    sources, results = _unit(source_images(edits)), _unit(edited)
    background = ~torch.as_tensor(np.stack([case.changed for case in edits]))
    errors = edit_error(edited, edits)
    readings = scorers.oracle.predict(results.float() * 2.0 - 1.0)
    shape_ok = np.array([r == c.value for r, c in zip(readings["shape"], edits, strict=True)])
    colors = [c.source.scene.objects[0].color for c in edits]
    color_ok = np.array([r == c for r, c in zip(readings["color"], colors, strict=True)])
    backgrounds = [c.source.scene.background for c in edits]
    background_ok = np.array([r == b for r, b in zip(readings["background"], backgrounds, strict=True)])
    scores = {
        "edit_success": float(np.mean(shape_ok & color_ok & background_ok)),
        "oracle_target_shape": float(np.mean(shape_ok)),
        "oracle_kept_color": float(np.mean(color_ok)),
        "oracle_kept_background": float(np.mean(background_ok)),
        "gt_psnr_db": _mean(errors["psnr_all"]),
        "gt_psnr_changed_db": _mean(errors["psnr_changed"]),
        "gt_psnr_unchanged_db": _mean(errors["psnr_unchanged"]),
        "bg_psnr_db": _mean(psnr(results, sources, background)),
        "bg_ssim": _mean(ssim(results, sources, background)),
        "bg_mse": _mean(mse(results, sources, background)),
    }
    if scorers.perceptual is not None:
        with torch.no_grad():
            distance = scorers.perceptual(results.float(), sources.float(), background)
        scores["bg_lpips"] = _mean(distance)
    if scorers.structure_tokens is not None:
        with torch.no_grad():
            tokens_edit = patch_tokens(scorers.structure_tokens(results.float()))
            tokens_source = patch_tokens(scorers.structure_tokens(sources.float()))
        scores["structure_dist_x1e3"] = _mean(structure_distance(tokens_edit, tokens_source)) * 1e3
    return scores


def invert_scenes(
    model,
    edits: list[GroundTruthEdit],
    method: str,
    steps: int,
    guidance: float,
    learning_rate: float | None = None,
    image_encoder=None,
    settings: dict | None = None,
    prompt: str | None = None,
) -> InversionResult:
    """Invert every scene with `method` (its paper defaults, overridden by `learning_rate`/`settings`).

    `prompt` ("source" or "target" caption) overrides the method's default prompt.

    Raises:
        EngineInputError: the engine refuses the method or its settings.
    """
    override = {} if learning_rate is None else {"learning_rate": learning_rate}
    config = InversionConfig.of(
        method, num_steps=steps, guidance_scale=guidance, **override, **(settings or {})
    )
    # Prompt tuning inverts towards the target prompt (Algorithm 1 initialises c_T from c*).
    prompt_of = prompt or ("target" if config.info.default_prompt == "target" else "source")
    prompts = [getattr(case, prompt_of).caption for case in edits]
    return invert(model, source_images(edits), prompts, config, image_encoder=image_encoder)


def edit_scenes(
    model, inversion: InversionResult, edits: list[GroundTruthEdit], control: AttentionControl
) -> tuple[list[EditResult], float]:
    """Edit every inverted scene towards its target caption; (results, wall seconds).

    Raises:
        EngineInputError: the engine refuses the control for this inversion.
    """
    requests = [EditRequest(i, case.target.caption, control) for i, case in enumerate(edits)]
    started = time.perf_counter()
    results = edit(model, inversion, requests)
    return results, time.perf_counter() - started


def inversion_row(
    edits: list[GroundTruthEdit], inversion: InversionResult, invert_seconds: float
) -> dict[str, float]:
    """Reconstruction scores of the usable inversions and the inversion's seconds per image."""
    usable = torch.tensor([error is None for error in inversion.errors])
    recon = reconstruction_scores(inversion.reconstructions[usable], source_images(edits)[usable])
    return recon | {
        "failed_inversions": int((~usable).sum()),
        "invert_seconds_per_image": invert_seconds / len(edits),
    }


def editor_row(
    model, inversion: InversionResult, edits: list[GroundTruthEdit], editor: str, scorers: Scorers
) -> dict[str, float]:
    """Edit every scene with `editor` and score the edits that came back (failures are counted).

    Raises:
        EngineInputError: the engine refuses the editor's control for this inversion.
    """
    results, edit_seconds = edit_scenes(model, inversion, edits, EDITORS[editor])
    done = [(result, case) for result, case in zip(results, edits, strict=True) if result.error is None]
    row = {"failed_edits": len(edits) - len(done)}
    if done:
        edited = torch.stack([result.image for result, _ in done])
        row |= score_edits(edited, [case for _, case in done], scorers)
    return row | {"edit_seconds_per_image": edit_seconds / len(edits)}


def benchmark_rows(
    model,
    edits: list[GroundTruthEdit],
    scorers: Scorers,
    methods: list[str],
    editors: list[str],
    steps: int,
    guidance: float,
    learning_rates: list[float] = (),
    image_encoder=None,
    settings: dict[str, dict] | None = None,
    encoder_fit_steps: int = 0,
    fit_methods: list[str] = (),
) -> tuple[list[dict], list[dict]]:
    """One row per (inversion, editor) the engine accepts, and one entry per skipped combination.

    Args:
        model: the diffusion model.
        edits: the scenes and their ground-truth edits.
        scorers: what judges the edits.
        methods: registered inversion methods.
        editors: names in EDITORS.
        steps: DDIM steps.
        guidance: w of reconstruction and editing.
        learning_rates: extra rows "METHOD (lr X)" of OPTIMISED_METHODS.
        image_encoder: the CLIP vision tower for methods that need one.
        settings: per method, parameters overriding its defaults.
        encoder_fit_steps: K > 0 adds rows "METHOD (fit K)" for `fit_methods`: the method's defaults
            with `encoder_fit_steps: K` (each image's latent fitted to the decoder before inverting).
        fit_methods: registered inversion methods of those rows.

    Returns:
        (rows, skipped): rows hold inversion, method, editor and the metrics; skipped entries hold
        inversion, editor and the engine's reason.
    """
    rows, skipped = [], []
    runs = [(method, method, None, 0) for method in methods]
    runs += [
        (f"{method} (lr {lr:g})", method, lr, 0)
        for lr in learning_rates
        for method in methods
        if method in OPTIMISED_METHODS
    ]
    if encoder_fit_steps:
        runs += [(f"{m} (fit {encoder_fit_steps})", m, None, encoder_fit_steps) for m in fit_methods]
    for name, method, learning_rate, fit_steps in runs:
        encoder = image_encoder if get_method(method).needs_image_encoder else None
        method_settings = (settings or {}).get(method, {}) | (
            {"encoder_fit_steps": fit_steps} if fit_steps else {}
        )
        started = time.perf_counter()
        try:
            inversion = invert_scenes(
                model, edits, method, steps, guidance, learning_rate, encoder, method_settings
            )
        except EngineInputError as error:
            skipped += [{"inversion": name, "editor": editor, "reason": str(error)} for editor in editors]
            print(f"skipped {name}: {error}", flush=True)
            continue
        recon = inversion_row(edits, inversion, time.perf_counter() - started)
        for editor in editors:
            try:
                scores = editor_row(model, inversion, edits, editor, scorers)
            except EngineInputError as error:
                skipped.append({"inversion": name, "editor": editor, "reason": str(error)})
                print(f"skipped {name} x {editor}: {error}", flush=True)
                continue
            rows.append({"inversion": name, "method": method, "editor": editor} | recon | scores)
            print(json.dumps(_rounded(rows[-1])), flush=True)
    return rows, skipped


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
    """One method with a P2P word swap (the single-method benchmarks): its row's metrics.

    Raises:
        RuntimeError: an inversion or an edit failed.
    """
    started = time.perf_counter()
    inversion = invert_scenes(model, edits, method, steps, guidance, learning_rate, image_encoder, settings)
    row = inversion_row(edits, inversion, time.perf_counter() - started)
    row |= editor_row(model, inversion, edits, "P2P", Scorers(oracle, structure_tokens=structure_tokens))
    if row["failed_inversions"] or row["failed_edits"]:
        raise RuntimeError(
            f"{method}: {row['failed_inversions']} inversions, {row['failed_edits']} edits failed"
        )
    return row


# PTI's Table 2 setting (Dong et al. §4.3): DDIM forward process unconditional (w = 0), sampling at
# w = 7.5, NTI and PTI with N = 5 and beta = 0.01, the image's own caption, the whole schedule. PTI
# once with Algorithm 1's plain gradient step and once with null-text's Adam: row name -> (method, settings).
PTI_TABLE_2_SETTINGS = {
    "ddim": ("ddim", {"inversion_guidance": 0.0}),
    "null_text": ("null_text", {"inversion_guidance": 0.0, "inner_steps": 5, "learning_rate": 0.01}),
    "prompt_tuning": ("prompt_tuning", {"inner_steps": 5, "learning_rate": 0.01, "strength": 1.0}),
    "prompt_tuning (adam)": (
        "prompt_tuning",
        {"inner_steps": 5, "learning_rate": 0.01, "strength": 1.0, "optimizer": "adam"},
    ),
}


def pti_table_2_rows(model, edits: list[GroundTruthEdit], steps: int, guidance: float) -> list[dict]:
    """Reconstruction of DDIM, NTI and PTI in PTI's Table 2 setting, inverted with the source caption."""
    rows = []
    for name, (method, settings) in PTI_TABLE_2_SETTINGS.items():
        started = time.perf_counter()
        inversion = invert_scenes(model, edits, method, steps, guidance, settings=settings, prompt="source")
        scores = inversion_row(edits, inversion, time.perf_counter() - started)
        rows.append({"inversion": name, "method": method, "settings": settings} | scores)
        print("PTI Table 2 setting", json.dumps(_rounded(rows[-1])), flush=True)
    return rows


def _rounded(value):
    """Floats to 4 decimals (5 significant digits when smaller), recursively; for the JSON and the logs."""
    if isinstance(value, float):
        if not math.isfinite(value):
            return None if math.isnan(value) else value
        return round(value, 4) if abs(value) >= 0.01 else float(f"{value:.5g}")
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_rounded(item) for item in value]
    return value


def recon_by_inversion(table: dict) -> dict[str, dict]:
    """Per inversion (the "vae" row first), its first row: the reconstruction is the same for every editor."""
    first = {}
    for row in table["rows"]:
        first.setdefault(row["inversion"], row)
    return first


def _ordering(values: dict[str, float], expected: list[str], higher_is_better: bool, unit: str) -> str:
    """ "holds" or "does not hold", with the measured order of the `expected` names by their values."""
    present = [name for name in expected if name in values and math.isfinite(values[name])]
    if len(present) < len(expected):
        return f"not measured (missing {sorted(set(expected) - set(present))})"
    measured = sorted(present, key=lambda name: values[name], reverse=higher_is_better)
    sign = " > " if higher_is_better else " < "
    order = sign.join(f"{name} {_number(values[name])}{unit}" for name in measured)
    verdict = "holds" if measured == expected else "does not hold"
    return f"{verdict}: measured {order}"


def _number(value: float) -> str:
    return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3g}"


PTI_TABLE_2 = [VAE_ROW, "prompt_tuning", "null_text", "ddim"]  # AE > PTI > NTI >> DDIM (reconstruction)
PNP_TABLE_1 = ["direct", "null_text", "negative_prompt", "ddim"]  # best to worst: structure, background


def ordering_checks(table: dict) -> dict[str, str]:
    """Whether PTI's Table 2 and PnP Inversion's Table 1 orderings hold on the measured rows.

    PTI Table 2: reconstruction PSNR and SSIM, AE > PTI > NTI >> DDIM (w = 7.5). PnP Inversion Table 1
    (as commonly reported; P2P editing): Direct Inversion best on structure distance and background
    preservation, then NTI, then NPI, DDIM worst; compared on the P2P rows.
    """
    recon = recon_by_inversion(table)
    p2p = {row["inversion"]: row for row in table["rows"] if row.get("editor") == "P2P"}

    def column(rows: dict[str, dict], key: str) -> dict[str, float]:
        return {name: row[key] for name, row in rows.items() if isinstance(row.get(key), float)}

    checks = {
        "PTI Table 2, recon PSNR (AE > PTI > NTI > DDIM)": _ordering(
            column(recon, "recon_psnr_db"), PTI_TABLE_2, True, " dB"
        ),
        "PTI Table 2, recon SSIM (AE > PTI > NTI > DDIM)": _ordering(
            column(recon, "recon_ssim"), PTI_TABLE_2, True, ""
        ),
    }
    if {"null_text", "ddim"} <= set(recon):
        gap = recon["null_text"]["recon_psnr_db"] - recon["ddim"]["recon_psnr_db"]
        checks["PTI Table 2, NTI - DDIM recon PSNR gap (paper: 10.81 dB)"] = f"{gap:.2f} dB"
    if table.get("pti_table_2_rows"):
        setting = {VAE_ROW: recon.get(VAE_ROW, {})} | {
            row["inversion"]: row for row in table["pti_table_2_rows"]
        }
        adam = [VAE_ROW, "prompt_tuning (adam)", "null_text", "ddim"]
        for key, label, unit in (("recon_psnr_db", "PSNR", " dB"), ("recon_ssim", "SSIM", "")):
            for variant, order in (("PTI's plain gradient step", PTI_TABLE_2), ("PTI with Adam", adam)):
                checks[
                    f"PTI Table 2 in its own setting, {variant}, recon {label} (AE > PTI > NTI > DDIM)"
                ] = _ordering(column(setting, key), order, True, unit)
    for key, label, higher in (
        ("structure_dist_x1e3", "structure distance x1e3", False),
        ("bg_psnr_db", "background PSNR", True),
        ("bg_lpips", "background LPIPS", False),
        ("bg_mse", "background MSE", False),
        ("bg_ssim", "background SSIM", True),
    ):
        unit = " dB" if key.endswith("_db") else ""
        checks[f"PnP Table 1, {label} (Direct > NTI > NPI > DDIM), P2P"] = _ordering(
            column(p2p, key), PNP_TABLE_1, higher, unit
        )
    return checks


TABLE_COLUMNS = {
    "recon_psnr_db": "recon PSNR",
    "recon_ssim": "recon SSIM",
    "edit_success": "edit success",
    "gt_psnr_db": "GT PSNR",
    "gt_psnr_changed_db": "GT PSNR R",
    "gt_psnr_unchanged_db": "GT PSNR ~R",
    "bg_psnr_db": "bg PSNR",
    "bg_ssim": "bg SSIM",
    "bg_mse": "bg MSE x1e3",
    "bg_lpips": "bg LPIPS",
    "structure_dist_x1e3": "struct. x1e3",
    "invert_seconds_per_image": "invert s/img",
    "edit_seconds_per_image": "edit s/img",
}


def _cell(key: str, value) -> str:
    if not isinstance(value, float | int) or isinstance(value, bool):
        return "-"
    if key == "bg_mse":
        value = value * 1e3
    if not math.isfinite(value):
        return str(value)
    if key in ("recon_ssim", "bg_ssim", "bg_lpips", "edit_success"):
        return f"{value:.3f}"
    return f"{value:.2f}"


def render_markdown(table: dict, plot: str = "benchmarks/results/world_editing.png") -> str:
    """The README section: command, setup, the table, the plot and the ordering checks."""
    lines = [
        "    " + table["command"],
        "",
        f"{table['setup']}. Means over scenes; R is the ground-truth changed region, bg_* compare the edit",
        "with the source outside R (bg LPIPS: the oracle's features), struct.: structure distance to the",
        "source (shapes CLIP patch tokens); edit success: the oracle reads the target shape with colour",
        "and background kept. The `vae` row is decode(encode(x)), the reconstruction ceiling.",
        "",
        "| inversion | editor | " + " | ".join(TABLE_COLUMNS.values()) + " |",
        "| --- | --- |" + " ---: |" * len(TABLE_COLUMNS),
    ]
    for row in table["rows"]:
        cells = [_cell(key, row.get(key)) for key in TABLE_COLUMNS]
        lines.append(f"| {row['inversion']} | {row.get('editor') or '-'} | " + " | ".join(cells) + " |")
    for entry in table.get("skipped", []):
        lines.append(f"\nSkipped {entry['inversion']} x {entry['editor']}: {entry['reason']}")
    failed = [row for row in table["rows"] if row.get("failed_edits") or row.get("failed_inversions")]
    for row in failed:
        lines.append(
            f"\n{row['inversion']} x {row['editor']}: {row.get('failed_inversions', 0)} inversions and "
            f"{row.get('failed_edits', 0)} edits failed (left out of the means)."
        )
    if table.get("pti_table_2_rows"):
        lines += [
            "",
            "Reconstruction in PTI Table 2's own setting (DDIM forward at w = 0, sampling at w = 7.5; NTI and",
            "PTI with N = 5, beta = 0.01; inverted with the source caption over the whole schedule):",
            "",
            "| inversion | settings | recon PSNR | recon SSIM | invert s/img |",
            "| --- | --- | ---: | ---: | ---: |",
        ]
        for row in table["pti_table_2_rows"]:
            settings = ", ".join(f"{key} {value}" for key, value in row["settings"].items())
            cells = [
                _cell(key, row.get(key))
                for key in ("recon_psnr_db", "recon_ssim", "invert_seconds_per_image")
            ]
            lines.append(f"| {row['inversion']} | {settings} | " + " | ".join(cells) + " |")
    lines += ["", f"![world editing benchmark]({plot})", "", "Orderings of the papers, on these numbers:", ""]
    lines += [f"- {name}: {verdict}" for name, verdict in table["orderings"].items()]
    return "\n".join(lines)


def update_readme(table: dict, readme: Path = README) -> None:
    """Replace the README's text between README_BEGIN and README_END with `render_markdown(table)`."""
    text = readme.read_text()
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < begin:
        raise ValueError(f"{readme} has no '{README_BEGIN}' ... '{README_END}' section to fill")
    readme.write_text(text[: begin + len(README_BEGIN)] + "\n" + render_markdown(table) + "\n" + text[end:])


def plot(table: dict, path: Path):
    """Reconstruction PSNR per inversion (the VAE bounds as lines), edit success against background
    PSNR per inversion x editor, and seconds per image; saved to `path` and returned (a Figure)."""
    import matplotlib
    from matplotlib.figure import Figure

    recon = recon_by_inversion(table)
    # Rows without an editor are decode(encode(x)) bounds ("vae", "vae (fit K)"), drawn as lines.
    bounds = [row["inversion"] for row in table["rows"] if row.get("editor") is None]
    methods = [name for name in recon if name not in bounds]
    figure = Figure(figsize=(16, 4.8), layout="constrained")
    bars, scatter, seconds = figure.subplots(1, 3, width_ratios=[1, 1.3, 1])
    positions = np.arange(len(methods))
    bars.bar(positions, [recon[name]["recon_psnr_db"] for name in methods], color="tab:blue")
    for name, style in zip(bounds, itertools.cycle(("--", ":", "-.")), strict=False):
        bars.axhline(recon[name]["recon_psnr_db"], color="black", linestyle=style, label=f"{name} bound")
    if bounds:
        bars.legend(loc="lower right", fontsize=8)
    bars.set_xticks(positions, methods, rotation=35, ha="right", fontsize=8)
    bars.set_ylabel("reconstruction PSNR (dB)")
    bars.set_title("reconstruction")
    markers = {"P2P": "o", "P2Plus": "s", "none": "^"}
    palette = matplotlib.colormaps["tab20"].colors[::2] + matplotlib.colormaps["tab20"].colors[1::2]
    colours = {name: palette[index % len(palette)] for index, name in enumerate(methods)}
    for row in table["rows"]:
        if row.get("editor") is None or "edit_success" not in row:
            continue
        scatter.scatter(
            row["bg_psnr_db"],
            row["edit_success"],
            marker=markers.get(row["editor"], "x"),
            color=colours[row["inversion"]],
            s=45,
            alpha=0.8,
        )
    for name in methods:
        scatter.scatter([], [], color=colours[name], marker="o", label=name)
    for editor, marker in markers.items():
        scatter.scatter(
            [], [], facecolors="none", edgecolors="black", marker=marker, label=f"editor {editor}"
        )
    scatter.set_xlabel("background PSNR outside the changed region (dB)")
    scatter.set_ylabel("edit success (oracle)")
    scatter.set_ylim(-0.05, 1.05)
    scatter.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    scatter.set_title("editability vs preservation")
    seconds.bar(positions, [recon[name]["invert_seconds_per_image"] for name in methods], color="tab:orange")
    seconds.set_yscale("log")
    seconds.set_xticks(positions, methods, rotation=35, ha="right", fontsize=8)
    seconds.set_ylabel("inversion seconds per image (log)")
    seconds.set_title("cost")
    figure.suptitle(table["setup"], fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return figure


def record_in_model_card(table: dict, assets: Path) -> None:
    """Store the table under "editing" in benchmark_metrics.json and rewrite MODEL_CARD.md."""
    from pipeline.world.model_card import write_model_card

    path = assets / "benchmark_metrics.json"
    record = json.loads(path.read_text()) if path.is_file() else {}
    record["editing"] = _rounded({key: table[key] for key in ("setup", "vae_psnr_db", "rows", "skipped")})
    path.write_text(json.dumps(record, indent=2))
    write_model_card(assets)


def world_scorers(assets: Path, device) -> tuple[Scorers, Callable]:
    """The shapes world's oracle, NS-LPIPS on the oracle's features and the shapes CLIP vision tower
    (structure distance, and style_diffusion's E(x)); returns (scorers, image_encoder)."""
    from pipeline.metrics.clip import ClipScorer
    from pipeline.metrics.perceptual import build_perceptual
    from pipeline.world.clip_model import SHAPES_CLIP_NAME, register_shapes_clip
    from pipeline.world.oracle import OracleFeatures, load_oracle

    oracle = load_oracle(assets)
    perceptual = build_perceptual(
        "features:shapes-oracle", device="cpu", feature_extractor=OracleFeatures(load_oracle(assets))
    )
    register_shapes_clip()
    image_encoder = ClipScorer(SHAPES_CLIP_NAME, str(assets / "shapes_clip.safetensors"), device).image_tokens
    return Scorers(oracle, perceptual, image_encoder), image_encoder


def run(args: argparse.Namespace) -> dict:
    """Load the world's models, run every row and return the table."""
    from pipeline.models.loading import load_diffusion_model
    from pipeline.training.world_data import HELDOUT_SEED_OFFSET, SD_FOLDER_NAME
    from pipeline.world.groundtruth import shape_swap_edits

    torch.manual_seed(0)
    assets = Path(args.assets)
    model = load_diffusion_model(assets / SD_FOLDER_NAME)
    scorers, image_encoder = world_scorers(assets, model.device)
    edits = shape_swap_edits(range(HELDOUT_SEED_OFFSET, HELDOUT_SEED_OFFSET + args.scenes))
    setup = (
        f"{args.scenes} held-out one-object scenes, shape word swap, DDIM {args.steps} steps, w={args.guidance}, "
        f"each method's paper defaults unless marked; editors P2P (tau_c 0.8, tau_s 0.4), P2Plus (+ tau_u "
        f"{P2PLUS_TAU_U}), none (target prompt, no attention control); {torch.get_num_threads()} CPU "
        "thread(s)" + (", GPU" if model.device.type == "cuda" else "")
    )
    print(setup, flush=True)
    vae = vae_row(model, edits)
    print(json.dumps(_rounded(vae)), flush=True)
    fitted = [vae_row(model, edits, args.encoder_fit_steps)] if args.encoder_fit_steps else []
    for row in fitted:
        print(json.dumps(_rounded(row)), flush=True)
    rows, skipped = benchmark_rows(
        model,
        edits,
        scorers,
        args.methods,
        args.editors,
        args.steps,
        args.guidance,
        args.learning_rates,
        image_encoder,
        encoder_fit_steps=args.encoder_fit_steps,
        fit_methods=args.fit_methods or args.methods,
    )
    table2 = pti_table_2_rows(model, edits, args.steps, args.guidance) if args.pti_table_2 else []
    table = {
        # The flags that only choose where the numbers go are left out of the recorded command.
        "command": " ".join(
            ["python -m benchmarks.world_editing", *(a for a in args.argv if a not in OUTPUT_FLAGS)]
        ),
        "setup": setup,
        "vae_psnr_db": vae["recon_psnr_db"],
        "rows": [vae, *fitted, *rows],
        "skipped": skipped,
        "pti_table_2_rows": table2,
    }
    table["orderings"] = ordering_checks(table)
    return table


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    methods = list(method_names())
    parser.add_argument("--assets", default=None, help="shapes-world assets (default: the shipped ones)")
    parser.add_argument("--scenes", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps")
    parser.add_argument("--guidance", type=float, default=7.5, help="CFG scale of reconstruction and editing")
    parser.add_argument("--methods", nargs="+", default=methods, choices=methods, help="inversion methods")
    parser.add_argument("--editors", nargs="+", default=list(EDITORS), choices=list(EDITORS))
    parser.add_argument(
        "--learning-rates",
        type=float,
        nargs="*",
        default=[5e-2],
        help="null-text lr / prompt tuning beta of extra rows 'METHOD (lr X)' for the methods that "
        "optimise; the plain rows use each method's defaults (none: no extra rows)",
    )
    parser.add_argument(
        "--encoder-fit-steps",
        type=int,
        default=0,
        metavar="K",
        help="K > 0 adds rows 'METHOD (fit K)' and 'vae (fit K)': inversion.encoder_fit_steps K, each "
        "image's latent fitted to the decoder before inverting",
    )
    parser.add_argument(
        "--fit-methods",
        nargs="+",
        default=None,
        choices=methods,
        help="the methods of the fit rows (default: --methods)",
    )
    parser.add_argument(
        "--no-pti-table-2",
        dest="pti_table_2",
        action="store_false",
        help="leave out the reconstruction rows in PTI Table 2's setting",
    )
    parser.add_argument("--results", default=str(RESULTS / "world_editing"), help="writes .json and .png")
    parser.add_argument("--write", action="store_true", help="record the numbers in the model card")
    parser.add_argument("--readme", action="store_true", help="rewrite the README section from the JSON")
    parser.add_argument(
        "--render-only", action="store_true", help="run nothing: plot and README section from the JSON"
    )
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else []
    if args.assets is None:
        from pipeline.world.model_card import ASSETS

        args.assets = str(ASSETS)
    return args


def main(argv: list[str] | None = None) -> dict:
    import sys

    args = parse_args(sys.argv[1:] if argv is None else argv)
    results = Path(args.results)
    json_path, png_path = results.with_suffix(".json"), results.with_suffix(".png")
    if args.render_only:
        table = json.loads(json_path.read_text())
        table["orderings"] = ordering_checks(table)
    else:
        table = run(args)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(_rounded(table), indent=2) + "\n")
    print(f"wrote {json_path}")
    plot(table, png_path)
    print(f"wrote {png_path}")
    for name, verdict in table["orderings"].items():
        print(f"{name}: {verdict}")
    if args.write:
        record_in_model_card(table, Path(args.assets))
    if args.readme:
        update_readme(table)
    return table


if __name__ == "__main__":
    main()
