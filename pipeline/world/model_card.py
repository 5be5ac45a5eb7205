"""MODEL_CARD.md for the shapes world's trained models, written from the recorded metrics.

The card's fingerprint table (`| file | sha256 |`) is machine-checked: `read_card_fingerprints`
parses it back and a test compares it with the weight files.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from pipeline.training.fingerprints import weight_fingerprints

ASSETS = Path(__file__).parent / "assets"
CARD_NAME = "MODEL_CARD.md"
_ROW = re.compile(r"^\| `([^`]+\.safetensors)` \| `([0-9a-f]{64})` \|")


def read_card_fingerprints(card: str | os.PathLike = ASSETS / CARD_NAME) -> dict[str, str]:
    """{relative weight path: sha256} from the card's fingerprint table."""
    rows = (_ROW.match(line) for line in Path(card).read_text().splitlines())
    return {match.group(1): match.group(2) for match in rows if match}


def _metrics(assets: Path, name: str) -> dict:
    path = assets / name
    return json.loads(path.read_text()) if path.is_file() else {}


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{key} {_fmt(item)}" for key, item in value.items())
    return str(value)


def _editing_rows(editing: dict) -> list[dict]:
    """The benchmark's rows (inversion, editor, metrics); older records keyed P2P rows by method."""
    if "rows" in editing:
        return [row for row in editing["rows"] if row.get("editor")]
    return [{"inversion": name, "editor": "P2P"} | row for name, row in editing.get("methods", {}).items()]


def _editing_table(editing: dict) -> list[str]:
    """The per inversion x editor table of `benchmarks/world_editing.py`."""
    columns = (
        "recon_psnr_db", "recon_ssim", "edit_success", "gt_psnr_changed_db", "gt_psnr_unchanged_db",
        "bg_lpips", "structure_dist_x1e3", "invert_seconds_per_image",
    )  # fmt: skip
    lines = [
        f"Inversion x editing (`benchmarks/world_editing.py`): {editing.get('setup', '')}.",
        f"VAE reconstruction of the same scenes (the ceiling): {_fmt(editing.get('vae_psnr_db'))} dB.",
        "gt_* is the PSNR of the edited image against the counterfactual render (the ground-truth edit),",
        "inside the region the edit should change and outside it; all columns in",
        "`benchmarks/results/world_editing.json`.",
        "",
        "| inversion | editor | " + " | ".join(columns) + " |",
        "| --- | --- |" + " --- |" * len(columns),
    ]
    for row in _editing_rows(editing):
        cells = " | ".join(_fmt(row.get(column, "-")) for column in columns)
        lines.append(f"| {row['inversion']} | {row['editor']} | {cells} |")
    return lines


def _targets(benchmark: dict) -> list[str]:
    """Whether the quality targets (oracle agreement >= 0.9, VAE PSNR >= 30 dB, null-text
    reconstruction within 2 dB of the VAE's) are met, in words."""
    agreement = benchmark.get("oracle_agreement_heldout_captions", {})
    missed = [
        f"{name} agreement {agreement[name]:.3f} < 0.90"
        for name in ("shape", "color")
        if agreement.get(name, 0) < 0.9
    ]
    if benchmark.get("vae_psnr_db_heldout", 0.0) < 30.0:
        missed.append(f"VAE PSNR {benchmark.get('vae_psnr_db_heldout', 0.0):.1f} dB < 30 dB")
    editing = benchmark.get("editing", {})
    null_text = next(
        (row for row in _editing_rows(editing) if (row["inversion"], row["editor"]) == ("null_text", "P2P")),
        None,
    )
    if null_text and null_text["recon_psnr_db"] < editing["vae_psnr_db"] - 2.0:
        missed.append(
            f"null-text reconstruction {null_text['recon_psnr_db']:.1f} dB is more than 2 dB below the "
            f"VAE's {editing['vae_psnr_db']:.1f} dB"
        )
    if not missed:
        return [
            "Targets met: oracle agreement >= 0.90 for shape and colour, VAE PSNR >= 30 dB"
            + (", null-text reconstruction within 2 dB of the VAE's." if null_text else ".")
        ]
    return [
        "**Targets not met** (" + "; ".join(missed) + ").",
        "The levers are more training (`python -m pipeline.world.train unet --resume`,",
        "`python -m pipeline.world.train vae-decoder`, `max_minutes` in the job file), more capacity",
        "(`unet.channels`, the text encoder's width and layers) and a GPU.",
    ]


def write_model_card(
    assets: str | os.PathLike = ASSETS, config_path: str | os.PathLike = "jobs/train_shapes_world.yaml"
) -> Path:
    """Write assets/MODEL_CARD.md from train_metrics.json, benchmark_metrics.json and the weight files."""
    assets = Path(assets)
    repo = Path(__file__).resolve().parents[2]
    if Path(config_path).resolve().is_relative_to(repo):
        config_path = Path(config_path).resolve().relative_to(repo)
    training = _metrics(assets, "train_metrics.json")
    benchmark = _metrics(assets, "benchmark_metrics.json")
    lines = [
        "# Shapes-world models",
        "",
        "Small models trained from scratch on the procedural shapes world (`pipeline/world/generator.py`):",
        "64x64 RGB scenes of one or two shapes (circle, square, triangle, star) in six colours on six",
        "backgrounds (white, gray, black, striped, checkered, cloudy). Captions: `a {color} {shape} on a",
        "{background} background`, or `a {color} {shape} and a {color} {shape} on a {background} background`.",
        "They are inversa's embedded default: offline, in the real architectures, loaded by the same code.",
        "",
        "| model | files | architecture |",
        "| --- | --- | --- |",
        "| diffusion | `shapes-sd/` (diffusers folder) | AutoencoderKL 64x64x3 -> 16x16x4, CLIPTextModel with CLIP's BPE "
        "tokenizer, UNet2DConditionModel with cross-attention; DDIM scheduler with SD's scaled_linear betas |",
        "| CLIP | `shapes_clip.safetensors`, `open_clip/shapes-clip-vit-tiny.json` | open_clip ViT (patch 8, 64 px) + "
        "text transformer, context 77, vocab 49,408; name `shapes-clip-vit-tiny`; the metric backbone |",
        "| guidance CLIP | `shapes_clip_guide.safetensors` | the same architecture trained longer with counterfactual "
        "hard negatives and resized positives; for trained editors' direction loss (a training spec's `clip.pretrained`) |",
        "| guidance CLIP, 4-pixel patches | `shapes_clip_guide_p4.safetensors` (float16), "
        "`jobs/architectures/shapes-clip-vit-tiny-p4.json` | the guidance CLIP's recipe on 4x4 patches (name "
        "`shapes-clip-vit-tiny-p4`); the second CLIP (`extra_clips`) of `jobs/train_diffusion_clip_star_ensemble.yaml` |",
        "| oracle | `oracle.safetensors`, `oracle.json` | CNN with shape / color / background heads "
        "(`pipeline.world.oracle`); evaluation only, never a training signal |",
        "",
        "## Data",
        "",
        "Scenes are rendered in memory from seeds by the training job (`" + str(config_path) + "`): training",
        "seeds 0..N-1 with 15% two-object scenes and a list of held-out one-object captions never rendered for",
        "training; held-out scenes use seeds from 1,000,000. The oracle is trained and scored on one-object",
        "scenes (in a two-object scene nothing in the pixels says which object is the primary one). It judges",
        "decoded samples and edits, so half of each training batch is the shipped VAE's reconstruction of the",
        "batch's renders (same labels) and half is blurred; its record gives its held-out accuracy on renders,",
        "blurred renders and VAE reconstructions.",
        "",
        "Sample shards (`jobs/data/shapes_sample/`, 48 scenes in 3 shards, star deliberately rare at ~5%):",
        "",
        "    python -m pipeline.world.shards jobs/data/shapes_sample --count 48 --shard-size 16 \\",
        "        --seed 2000000 --rare-shape star --rare-fraction 0.05",
        "",
        "## Training (2 shared CPU cores, seeded; each stage stops at its step count or its time budget)",
        "",
        "    python -m pipeline.world.train all --config jobs/train_shapes_world.yaml",
        "    python -m benchmarks.world_quality --write  # quality numbers below; rewrites this card",
        "",
        "`all` runs vae, vae-decoder, clip, clip-guide, unet, vae-broad, oracle in turn; `vae-decoder` fine-tunes the decoder",
        "only (the encoder, hence the UNet's latent space, is kept; the unet stage saves the decoder that is in",
        "the cache when it finishes); `vae-broad` fine-tunes the shipped VAE on off-palette scenes",
        "(`pipeline/world/broad.py`) with the encoder's latents of the world's scenes anchored to the shipped",
        "encoder's, and records held-out PSNR (mean, worst) per family before and after and the world latents'",
        "RMS shift in latent std units; re-running `vae` drops the vae_decoder record. Each record's wall time is on 2 CPU",
        "cores (`--threads` torch threads, other work sometimes sharing them); on a GPU the same command uses it.",
        "The UNet loss weights latent pixels covered by objects by 1 + object_loss_weight x coverage and uses",
        "Min-SNR-gamma weighting (Hang et al. 2023); see `diffusion_loss` in `pipeline/training/world_unet.py`.",
        "",
        "The 4-pixel-patch guidance CLIP is a second clip-guide run beside the shipped one:",
        "",
        "    python -m pipeline.training clip-guide --set output=pipeline/world/assets --threads 2 \\",
        "        --set clip_guide.architecture=jobs/architectures/shapes-clip-vit-tiny-p4.json \\",
        "        --set clip_guide.steps=2500 --set clip_guide.max_minutes=60 \\",
        "        --set clip_guide.output_name=shapes_clip_guide_p4 --set clip_guide.save_dtype=float16",
        "",
        "| stage | steps | wall time (s) | metrics |",
        "| --- | --- | --- | --- |",
    ]
    for stage in (
        "vae",
        "vae_decoder",
        "clip",
        "clip_guide",
        "shapes_clip_guide_p4",
        "unet",
        "vae_broad",
        "oracle",
    ):
        record = dict(training.get(stage, {}))
        steps, wall = record.pop("steps", "-"), record.pop("wall_s", "-")
        lines.append(f"| {stage} | {steps} | {wall} | {_fmt(record) if record else 'not trained'} |")
    lines += [
        "",
        "## Loading",
        "",
        "    from pipeline.models.loading import load_diffusion_model",
        "    model = load_diffusion_model('pipeline/world/assets/shapes-sd')      # exactly as for SD 1.5",
        "",
        "    from pipeline.world.clip_model import load_shapes_clip, register_shapes_clip, SHAPES_CLIP_NAME",
        "    register_shapes_clip()   # open_clip.add_model_config(assets/open_clip)",
        "    model, _, preprocess = open_clip.create_model_and_transforms(",
        "        'shapes-clip-vit-tiny', pretrained='pipeline/world/assets/shapes_clip.safetensors')",
        "",
        "    from pipeline.world.oracle import load_oracle, images_to_tensor",
        "    oracle = load_oracle()   # .predict(x) -> {'shape': [...], 'color': [...], 'background': [...]};",
        "                             # .features(x) -> 4 feature maps; x is (B, 3, 64, 64) in [-1, 1]",
    ]
    lines += ["", "## Quality (`benchmarks/world_quality.py`)", ""]
    if benchmark:
        lines += [f"- {key}: {_fmt(value)}" for key, value in benchmark.items() if key != "editing"]
        if "editing" in benchmark:
            lines += ["", *_editing_table(benchmark["editing"])]
        lines += ["", *_targets(benchmark)]
    else:
        lines.append("- not measured yet")
    lines += [
        "",
        "## Fingerprints (sha256 of the weight files; checked by tests/world/test_assets.py)",
        "",
        "| file | sha256 |",
        "| --- | --- |",
    ]
    lines += [f"| `{name}` | `{digest}` |" for name, digest in weight_fingerprints(assets).items()]
    card = assets / CARD_NAME
    card.write_text("\n".join(lines) + "\n")
    return card
