"""Stochastic null-text edits on the shapes world: faithfulness and diversity of K samples per image.

Inverts the first N images of a sample shard with `null_text_vae`, then per image: the null-text
reconstruction's PSNR, the PSNR of K sampled reconstructions (target prompt = caption, no attention
control), and K sampled shape-to-star edits with their diversity (eq. 5: mean pairwise oracle-feature
perceptual distance) beside the bound (mean distance to the source) and the oracle's star rate,
against the deterministic (null-text) edit of the same prompt (the shapes demo's control).

    python benchmarks/stochastic_null_text.py --images 8 --samples 1 4 8 --temperatures 0 1 3 10

Measured with that command on 2 CPU cores (defaults: 20 steps, 10 VAE epochs, beta 1e-5, the residual
decoder trained along its own sampled path): inversion + VAE training 65 s for 8 images; null-text
reconstruction 28.41 dB; sampled reconstructions 28.21 / 28.19 / 27.36 / 23.18 dB at temperature
0 / 1 / 3 / 10; edit diversity 0 / 0.009 / 0.066 / 0.403 against a bound of 1.77-2.11; star rate
1.00 / 0.97 / 0.94 / 0.94 (the deterministic edit: 1.00); deterministic reruns identical. README,
"Stochastic null-text embeddings", has the other settings (`--decoder-base`, `--training-path`).
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.editors import load_null_text_vae
from pipeline.engine import AttentionControl, EditRequest, InversionConfig, edit, invert
from pipeline.metrics import build_perceptual, psnr
from pipeline.metrics.diversity import mean_pairwise_distance
from pipeline.models.loading import load_diffusion_model
from pipeline.world.oracle import perceptual_features, shape_classifier

ROOT = Path(__file__).resolve().parents[1]
SHARD = ROOT / "jobs" / "data" / "shapes_sample" / "shapes-000000.tar"


def read_samples(count: int, size: int) -> list[tuple[torch.Tensor, str, str]]:
    """(image uint8 (S, S, 3), caption, shape) of the first `count` non-star samples of the shard."""
    members: dict[str, dict[str, bytes]] = {}
    with tarfile.open(SHARD) as tar:
        for member in tar.getmembers():
            key, _, extension = member.name.partition(".")
            members.setdefault(key, {})[extension] = tar.extractfile(member).read()
    samples = []
    for key in sorted(members):
        files = members[key]
        shape = json.loads(files["json"])["shape"]
        if shape == "star":
            continue
        image = Image.open(io.BytesIO(files["png"])).convert("RGB").resize((size, size))
        samples.append((torch.from_numpy(np.asarray(image).copy()), files["txt"].decode().strip(), shape))
        if len(samples) == count:
            break
    return samples


def unit(images: torch.Tensor) -> torch.Tensor:
    return images.permute(0, 3, 1, 2).float() / 255.0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--samples", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0, 2.0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--beta", type=float, default=1e-5)
    parser.add_argument("--decoder-base", choices=["mean", "input"], default="input")
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--training-path", choices=["null_text", "sampled"], default="sampled")
    parser.add_argument(
        "--vae",
        help="a dataset-wide null-text VAE artefact (inversa train jobs/train_null_text_vae.yaml): every "
        "image samples from it and none is trained per image (--epochs etc. are then unused)",
    )
    parser.add_argument("--output", type=Path, help="write the measured numbers to this JSON file")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = load_diffusion_model(str(ROOT / "pipeline" / "world" / "assets" / "shapes-sd"), device="cpu")
    samples = read_samples(args.images, model.image_size)
    images = torch.stack([image for image, _, _ in samples])
    captions = [caption for _, caption, _ in samples]
    targets = [caption.replace(shape, "star") for _, caption, shape in samples]
    config = InversionConfig.of(
        "null_text_vae",
        num_steps=args.steps,
        guidance_scale=5.0,
        inner_steps=5,
        epochs=args.epochs,
        beta=args.beta,
        decoder_base=args.decoder_base,
        vae_learning_rate=args.vae_lr,
        training_path=args.training_path,
        vae=args.vae,
    )
    dataset_vae = load_null_text_vae(model, args.vae) if args.vae else None
    started = time.perf_counter()
    inversion = invert(model, images, captions, config, embedding_vae=dataset_vae)
    seconds = time.perf_counter() - started
    history = inversion.latents.edit_hook.history
    last = None
    if history is None:
        print(f"inversion of {len(samples)} images (the dataset VAE {args.vae}): {seconds:.1f} s")
    else:
        print(f"inversion + VAE training of {len(samples)} images: {seconds:.1f} s")
        last = history.reconstruction[-len(history.reconstruction) // 4 :].mean().item()
        print(f"VAE: L_rec over the last quarter {last:.2e}, KL {history.kl[-1].mean().item():.2f} nats")
    source = unit(images)
    null_text_psnr = psnr(unit(inversion.reconstructions), source).mean().item()
    print(f"null-text reconstruction PSNR: {null_text_psnr:.2f} dB")
    report = {
        "settings": {key: value for key, value in vars(args).items() if key != "output"},
        "inversion_and_training_seconds": seconds,
        "last_quarter_reconstruction_loss": last,
        "null_text_psnr": null_text_psnr,
        "rows": [],
    }
    distance = build_perceptual(
        "features:shapes-oracle", device="cpu", feature_extractor=perceptual_features()
    )
    classify = shape_classifier()
    blends = [
        AttentionControl(
            "replace", cross_replace_steps=0.8, self_replace_steps=0.4, blend_words=(shape, "star")
        )
        for _, _, shape in samples
    ]
    deterministic = edit(
        model, inversion, [EditRequest(i, targets[i], blends[i]) for i in range(len(samples))]
    )
    again = edit(model, inversion, [EditRequest(i, targets[i], blends[i]) for i in range(len(samples))])
    assert all(torch.equal(a.image, b.image) for a, b in zip(deterministic, again, strict=True))
    det_images = unit(torch.stack([result.image for result in deterministic]))
    det_star = np.mean([name == "star" for name in classify(det_images)])
    det_distance = distance(det_images, source).mean().item()
    print(
        f"deterministic edit: star rate {det_star:.2f}, LPIPS-oracle to source {det_distance:.4f}, reruns identical"
    )
    report["deterministic"] = {"star_rate": float(det_star), "distance_to_source": det_distance}
    most = max(args.samples)
    for temperature in args.temperatures:
        # Sample seeds 0..K-1 for the largest K; a smaller K's samples are the first K of them.
        recon_requests = [
            EditRequest(i, captions[i], AttentionControl("none"), seed=s, sample_temperature=temperature)
            for i in range(len(samples))
            for s in range(most)
        ]
        edit_requests = [
            EditRequest(i, targets[i], blends[i], seed=s, sample_temperature=temperature)
            for i in range(len(samples))
            for s in range(most)
        ]
        all_recons = unit(torch.stack([r.image for r in edit(model, inversion, recon_requests)]))
        all_edits = unit(torch.stack([r.image for r in edit(model, inversion, edit_requests)]))
        for count in args.samples:
            report["rows"].append(
                measure(all_recons, all_edits, source, most, count, distance, classify, temperature)
            )
            row = report["rows"][-1]
            diversity = "-" if row["diversity"] is None else f"{row['diversity']:.4f}"
            print(
                f"temperature {temperature:g}, K={count}: sampled reconstruction PSNR "
                f"{row['sampled_reconstruction_psnr']:.2f} dB; edits: diversity {diversity} "
                f"(bound {row['bound']:.4f}), star rate {row['star_rate']:.2f}"
            )
    if args.output is not None:
        args.output.write_text(json.dumps(report, indent=2))
        plot(report, args.output.with_suffix(".png"))


def measure(
    all_recons: torch.Tensor,
    all_edits: torch.Tensor,
    source: torch.Tensor,
    most: int,
    count: int,
    distance,
    classify,
    temperature: float,
) -> dict:
    """One (K, temperature) row from the first `count` of each image's `most` samples.

    Args:
        all_recons: (N * most, 3, S, S) sampled reconstructions in [0, 1], image-major.
        all_edits: (N * most, 3, S, S) sampled edits.
        source: (N, 3, S, S) the sources.
    """
    keep = torch.arange(all_edits.shape[0]).view(-1, most)[:, :count].flatten()
    recons, edits = all_recons[keep], all_edits[keep]
    per_image = source.repeat_interleave(count, dim=0)
    diversity = None
    if count > 1:
        diversity = float(
            np.mean(
                [
                    mean_pairwise_distance(edits[i * count : (i + 1) * count], distance)
                    for i in range(source.shape[0])
                ]
            )
        )
    return {
        "temperature": temperature,
        "samples": count,
        "sampled_reconstruction_psnr": psnr(recons, per_image).mean().item(),
        "diversity": diversity,
        "bound": distance(edits, per_image).mean().item(),
        "star_rate": float(np.mean([name == "star" for name in classify(edits)])),
    }


def plot(report: dict, path: Path) -> None:
    """Sampled reconstruction PSNR and edit diversity against the temperature, one line per K."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for count in sorted({row["samples"] for row in report["rows"]}):
        rows = [row for row in report["rows"] if row["samples"] == count]
        temperatures = [row["temperature"] for row in rows]
        left.plot(
            temperatures, [row["sampled_reconstruction_psnr"] for row in rows], marker="o", label=f"K={count}"
        )
        if count > 1:
            right.plot(temperatures, [row["diversity"] for row in rows], marker="o", label=f"K={count}")
    left.axhline(report["null_text_psnr"], color="grey", linestyle="--", label="null-text")
    left.axhline(report["null_text_psnr"] - 2.0, color="grey", linestyle=":", label="null-text - 2 dB")
    left.set(xlabel="temperature", ylabel="sampled reconstruction PSNR (dB)")
    right.set(xlabel="temperature", ylabel="edit diversity (eq. 5)")
    for axis in (left, right):
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


if __name__ == "__main__":
    main()
