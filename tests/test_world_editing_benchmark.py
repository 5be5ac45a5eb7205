"""The method benchmark (benchmarks/world_editing.py) on a tiny random-weight model at the world's 64 px:
one row per registered inversion method x editor the engine accepts, the VAE row, and its metrics
against independent computations (numpy, scikit-image) on edits built by hand."""

from __future__ import annotations

import dummy_method  # noqa: F401  (registers a method kept outside the package, as a user would)
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.metrics import structural_similarity

from benchmarks.world_editing import (
    EDITORS,
    README_BEGIN,
    README_END,
    VAE_ROW,
    Scorers,
    benchmark_rows,
    ordering_checks,
    plot,
    score_edits,
    update_readme,
    vae_row,
)
from pipeline.methods import method_names
from pipeline.metrics.perceptual import build_perceptual
from pipeline.models.build import SDArchitecture, build_random_sd
from pipeline.models.loading import load_diffusion_model
from pipeline.models.vae import decode_latents, encode_images
from pipeline.world.groundtruth import shape_swap_edits

SCENES = range(1_000_000, 1_000_002)
# Each method's cheapest settings: the test is about the table, not the methods' quality.
CHEAP = {
    "null_text": {"inner_steps": 1},
    "null_text_vae": {"inner_steps": 1, "epochs": 1},
    "style_diffusion": {"inner_steps": 1},
}


class ReadsWhatItIsTold:
    """Oracle stub: reads the given shapes, colours and backgrounds whatever the images."""

    def __init__(self, shapes: list[str], colors: list[str], backgrounds: list[str]):
        self.readings = {"shape": shapes, "color": colors, "background": backgrounds}

    def predict(self, images: torch.Tensor) -> dict[str, list[str]]:
        assert images.min() >= -1 and images.max() <= 1  # the oracle's input range
        return self.readings


class PixelFeatures(torch.nn.Module):
    """One feature map: the image itself, so LPIPS reduces to a closed form."""

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [images]


def pooled_tokens(images: torch.Tensor) -> torch.Tensor:
    """A stand-in vision tower: 4x4 pooled patches as tokens, their mean as CLS."""
    patches = F.avg_pool2d(images, 16).flatten(2).transpose(1, 2)
    return torch.cat([patches.mean(dim=1, keepdim=True), patches], dim=1)


@pytest.fixture(scope="module")
def world_sized_sd(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd-64")
    build_random_sd(folder, SDArchitecture(image_size=64), seed=0, unet_output_scale=0.05)
    return load_diffusion_model(folder)


@pytest.fixture(scope="module")
def edits():
    return shape_swap_edits(SCENES)


def true_oracle(edits) -> ReadsWhatItIsTold:
    return ReadsWhatItIsTold(
        [case.value for case in edits],
        [case.source.scene.objects[0].color for case in edits],
        [case.source.scene.background for case in edits],
    )


def unit(images: np.ndarray) -> np.ndarray:
    return np.asarray(images, dtype=np.float64) / 255.0


def test_every_registered_method_gets_a_row_per_editor_the_engine_accepts(world_sized_sd, edits):
    scorers = Scorers(true_oracle(edits), structure_tokens=pooled_tokens)
    methods = list(method_names())
    rows, skipped = benchmark_rows(
        world_sized_sd, edits, scorers, methods, list(EDITORS), 2, 7.5, (), pooled_tokens, CHEAP
    )

    assert "dummy_method:dummy" in methods  # a method registered outside the package is benchmarked too
    assert skipped == []
    assert [(row["inversion"], row["editor"]) for row in rows] == [
        (method, editor) for method in methods for editor in EDITORS
    ]
    assert all(row["failed_edits"] == 0 and row["failed_inversions"] == 0 for row in rows)
    by_name = {(row["inversion"], row["editor"]): row for row in rows}
    # Direct inversion holds the source branch on the inversion path: its reconstruction is the VAE's.
    vae = vae_row(world_sized_sd, edits)
    assert by_name[("direct", "P2P")]["recon_psnr_db"] == pytest.approx(vae["recon_psnr_db"], abs=1e-6)
    # Without attention control the target prompt regenerates from z_T: DDIM's and direct's z_T are one.
    assert by_name[("direct", "none")]["bg_psnr_db"] == pytest.approx(by_name[("ddim", "none")]["bg_psnr_db"])
    assert by_name[("ddim", "P2P")]["bg_psnr_db"] != by_name[("ddim", "none")]["bg_psnr_db"]


def test_a_combination_the_engine_refuses_is_skipped_with_its_reason(world_sized_sd, edits):
    rows, skipped = benchmark_rows(
        world_sized_sd,
        edits,
        Scorers(true_oracle(edits)),
        ["ddim", "style_diffusion"],
        ["P2P", "none"],
        2,
        7.5,
    )  # no image encoder: the engine refuses style_diffusion

    assert [(row["inversion"], row["editor"]) for row in rows] == [("ddim", "P2P"), ("ddim", "none")]
    assert [(entry["inversion"], entry["editor"]) for entry in skipped] == [
        ("style_diffusion", "P2P"),
        ("style_diffusion", "none"),
    ]
    assert all("image_encoder" in entry["reason"] for entry in skipped)


def test_the_vae_row_is_the_vae_reconstruction(world_sized_sd, edits):
    sources = np.stack([case.source.image for case in edits])
    with torch.no_grad():
        reconstructions = decode_latents(
            world_sized_sd, encode_images(world_sized_sd, torch.as_tensor(sources))
        )
    reconstructions = reconstructions.numpy()

    row = vae_row(world_sized_sd, edits)

    squared = (unit(reconstructions) - unit(sources)) ** 2
    expected_psnr = np.mean(10 * np.log10(1 / squared.mean(axis=(1, 2, 3))))
    expected_ssim = np.mean(
        [
            structural_similarity(unit(a), unit(b), channel_axis=-1, data_range=1.0)
            for a, b in zip(reconstructions, sources, strict=True)
        ]
    )
    assert row["inversion"] == VAE_ROW
    assert row["recon_psnr_db"] == pytest.approx(expected_psnr, rel=1e-9)
    assert row["recon_ssim"] == pytest.approx(expected_ssim, rel=1e-9)


def test_fit_rows_invert_the_latents_the_vae_fit_row_decodes(world_sized_sd, edits):
    fit_steps = 3
    rows, skipped = benchmark_rows(
        world_sized_sd,
        edits,
        Scorers(true_oracle(edits)),
        ["direct"],
        ["P2P"],
        2,
        7.5,
        encoder_fit_steps=fit_steps,
        fit_methods=["direct", "ddim"],
    )

    assert skipped == []
    assert [row["inversion"] for row in rows] == ["direct", "direct (fit 3)", "ddim (fit 3)"]
    by_name = {row["inversion"]: row for row in rows}
    plain, fitted = vae_row(world_sized_sd, edits), vae_row(world_sized_sd, edits, fit_steps)
    assert fitted["inversion"] == "vae (fit 3)" and fitted["encode_seconds_per_image"] > 0
    # Direct inversion reconstructs its clean latent exactly, so its fit row is the fitted VAE row...
    assert by_name["direct (fit 3)"]["recon_psnr_db"] == pytest.approx(fitted["recon_psnr_db"], abs=1e-6)
    assert by_name["direct"]["recon_psnr_db"] == pytest.approx(plain["recon_psnr_db"], abs=1e-6)
    # ...and the fit, which keeps each image's best latent, only raises it.
    assert fitted["recon_psnr_db"] > plain["recon_psnr_db"]
    # The fit changes what DDIM inverts, so its rows are not the plain encoder's.
    plain_ddim, _ = benchmark_rows(
        world_sized_sd, edits, Scorers(true_oracle(edits)), ["ddim"], ["P2P"], 2, 7.5
    )
    assert by_name["ddim (fit 3)"]["recon_psnr_db"] != plain_ddim[0]["recon_psnr_db"]


def test_edit_metrics_of_a_constructed_edit_match_their_closed_forms(edits):
    # The perfect edit inside R; outside R every channel of the source 20 levels off (never clipped).
    sources = np.stack([case.source.image for case in edits]).astype(np.int64)
    targets = np.stack([case.target.image for case in edits]).astype(np.int64)
    outside = ~np.stack([case.changed for case in edits])
    shifted = np.where(sources < 128, sources + 20, sources - 20)
    edited = np.where(outside[..., None], shifted, targets).astype(np.uint8)
    # The oracle reads the first edit right, the second as the wrong shape.
    oracle = true_oracle(edits)
    oracle.readings["shape"] = [edits[0].value, edits[1].source.scene.objects[0].shape]
    scorers = Scorers(oracle, build_perceptual("features:pixels", feature_extractor=PixelFeatures()))

    scores = score_edits(torch.as_tensor(edited), edits, scorers)

    assert scores["bg_mse"] == pytest.approx((20 / 255) ** 2, rel=1e-9)
    assert scores["bg_psnr_db"] == pytest.approx(20 * np.log10(255 / 20), rel=1e-9)
    assert scores["gt_psnr_unchanged_db"] == pytest.approx(scores["bg_psnr_db"])  # target = source outside R
    assert scores["gt_psnr_changed_db"] == float("inf")  # the perfect edit inside R
    ssims = []
    for i in range(len(edits)):
        _, ssim_map = structural_similarity(
            unit(edited[i]), unit(sources[i]), channel_axis=-1, data_range=1.0, full=True
        )
        interior = np.zeros_like(outside[i])
        interior[3:-3, 3:-3] = True
        ssims.append(ssim_map[outside[i] & interior].mean())
    assert scores["bg_ssim"] == pytest.approx(np.mean(ssims), rel=1e-9)

    # LPIPS on the pixels themselves: squared difference of the channel-normalised colours.
    def normalised(images):
        return unit(images) / (np.sqrt((unit(images) ** 2).sum(-1, keepdims=True)) + 1e-10)

    lpips_map = ((normalised(edited) - normalised(sources)) ** 2).sum(-1)
    expected_lpips = np.mean([lpips_map[i][outside[i]].mean() for i in range(len(edits))])
    assert scores["bg_lpips"] == pytest.approx(expected_lpips, rel=1e-5)
    assert (scores["edit_success"], scores["oracle_target_shape"], scores["oracle_kept_color"]) == (
        0.5,
        0.5,
        1.0,
    )


def test_edit_success_needs_the_target_shape_and_the_kept_colour_and_background(edits):
    oracle = true_oracle(edits)
    oracle.readings["color"] = [
        "not a colour",
        oracle.readings["color"][1],
    ]  # edit 0: shape right, colour lost
    oracle.readings["shape"] = [edits[0].value, "not a shape"]  # edit 1: colour kept, shape wrong
    edited = torch.as_tensor(np.stack([case.target.image for case in edits]))

    scores = score_edits(edited, edits, Scorers(oracle))

    assert (scores["oracle_target_shape"], scores["oracle_kept_color"], scores["edit_success"]) == (
        0.5,
        0.5,
        0.0,
    )


def _table(recon: dict[str, float], background: dict[str, float]) -> dict:
    rows = [{"inversion": name, "editor": None, "recon_psnr_db": value} for name, value in recon.items()]
    rows = rows[:1] + [
        {"inversion": name, "editor": "P2P", "recon_psnr_db": value, "bg_psnr_db": background.get(name, 0.0)}
        for name, value in list(recon.items())[1:]
    ]
    return {"rows": rows}


def test_orderings_are_read_from_the_measured_numbers():
    recon = {VAE_ROW: 31.0, "prompt_tuning": 30.0, "null_text": 29.0, "ddim": 20.0, "direct": 31.0}
    background = {"direct": 30.0, "null_text": 28.0, "negative_prompt": 25.0, "ddim": 20.0}
    recon["negative_prompt"] = 30.5
    checks = ordering_checks(_table(recon, background))
    assert checks["PTI Table 2, recon PSNR (AE > PTI > NTI > DDIM)"].startswith("holds")
    assert checks["PnP Table 1, background PSNR (Direct > NTI > NPI > DDIM), P2P"].startswith("holds")

    recon["null_text"], background["ddim"] = 30.2, 26.0  # NTI above PTI; DDIM above NPI
    checks = ordering_checks(_table(recon, background))
    assert checks["PTI Table 2, recon PSNR (AE > PTI > NTI > DDIM)"].startswith("does not hold")
    assert (
        "null_text 30.20 dB > prompt_tuning 30.00 dB"
        in checks["PTI Table 2, recon PSNR (AE > PTI > NTI > DDIM)"]
    )
    assert checks["PnP Table 1, background PSNR (Direct > NTI > NPI > DDIM), P2P"].startswith("does not hold")


def test_the_readme_section_is_rewritten_between_its_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{README_BEGIN}\nold numbers\n{README_END}\nafter\n")
    recon = {VAE_ROW: 31.0, "ddim": 20.0}
    table = _table(recon, {"ddim": 21.5}) | {"command": "python -m benchmarks.world_editing", "setup": "s"}
    table["orderings"] = ordering_checks(table)

    update_readme(table, readme)

    text = readme.read_text()
    assert text.startswith(f"before\n{README_BEGIN}\n") and text.endswith(f"{README_END}\nafter\n")
    assert "old numbers" not in text
    assert "| ddim | P2P | 20.00 |" in text and "| 21.50 |" in text


def test_the_plot_draws_every_bound_row_as_a_line_and_every_method_as_a_bar(tmp_path):
    table = {"setup": "s", "rows": [{"inversion": VAE_ROW, "editor": None, "recon_psnr_db": 31.0}]}
    for fit_steps, recon in ((25, 32.5), (100, 33.0), (400, 33.25)):  # more bounds than line styles
        table["rows"].append({"inversion": f"vae (fit {fit_steps})", "editor": None, "recon_psnr_db": recon})
    for name, recon, seconds in (("ddim", 20.0, 0.5), ("direct (fit 100)", 33.5, 2.0)):
        scores = {"recon_psnr_db": recon, "invert_seconds_per_image": seconds}
        table["rows"].append(
            {"inversion": name, "editor": "P2P", "edit_success": 1.0, "bg_psnr_db": 25.0} | scores
        )

    figure = plot(table, tmp_path / "plot.png")

    bars, _, seconds = figure.axes[:3]
    assert [patch.get_height() for patch in bars.patches] == [20.0, 33.5]
    assert [line.get_ydata()[0] for line in bars.get_lines()] == [31.0, 32.5, 33.0, 33.25]
    assert [patch.get_height() for patch in seconds.patches] == [0.5, 2.0]
    assert (tmp_path / "plot.png").stat().st_size > 0
