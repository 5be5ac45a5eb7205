"""The shapes world's oracle (`oracle` stage): the attribute classifier that judges samples and edits.

It is trained on one-object scenes and, with `oracle.decoded_fraction` > 0, on the shipped VAE's
reconstructions of them, so the stage runs after the unet stage. Writes OUTPUT/oracle.safetensors and
OUTPUT/oracle.json.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.training.fingerprints import sha256_file
from pipeline.training.loop import Budget, MetricsLog, optimize, seed_everything, training_device
from pipeline.training.world_config import TrainConfig
from pipeline.training.world_data import SceneSet, heldout_scenes, shipped_vae_folder, training_scenes
from pipeline.training.world_vae import shipped_vae, vae_reconstructions
from pipeline.world.oracle import HEADS, ShapesOracle, images_to_tensor

ORACLE_SEED_OFFSET = 0


def train_oracle(config: TrainConfig) -> ShapesOracle:
    """Train the attribute classifier on one-object scenes; report held-out accuracy per head.

    With `oracle.decoded_fraction` > 0 it needs the shipped VAE (OUTPUT/shapes-sd/vae, written by the
    unet stage): part of every batch is that VAE's reconstruction of the batch's scenes.

    Args:
        config: the training job.

    Returns:
        The trained oracle, on the CPU in eval mode.
    """
    rng = seed_everything(config.seed + ORACLE_SEED_OFFSET)
    data = training_scenes(config)
    one = np.nonzero(data.n_objects == 1)[0]
    # The shipped VAE, when there is one, also gives the held-out check on its reconstructions.
    has_vae = shipped_vae_folder(config).is_dir()
    vae = shipped_vae(config) if has_vae or config.oracle.decoded_fraction > 0 else None
    decoded = (
        decoded_training_images(config, vae, data.images) if config.oracle.decoded_fraction > 0 else None
    )
    device = training_device()
    oracle = ShapesOracle(config.oracle.widths).to(device)
    optimizer = torch.optim.AdamW(oracle.parameters(), lr=config.oracle.lr, weight_decay=1e-4)

    def loss_step() -> torch.Tensor:
        index = rng.choice(one, config.oracle.batch)
        images = images_to_tensor(data.images[index])
        if decoded is not None:
            swap = rng.random(len(index)) < config.oracle.decoded_fraction
            images[swap] = images_to_tensor(decoded[index[swap]])
        images = random_blur(images, config.oracle.blur_sigma_max, rng)
        logits = oracle(images.to(device))
        return sum(
            F.cross_entropy(logits[name], torch.as_tensor(data.labels[name][index], device=device))
            for name in HEADS
        )

    budget = Budget(config.oracle.steps, config.oracle.max_minutes)
    optimize(loss_step, optimizer, budget, stage="oracle", peak_lr=config.oracle.lr)
    oracle.cpu().eval()
    heldout = heldout_scenes(config, two_object_fraction=0.0)
    metrics = {
        "steps": budget.step,
        "wall_s": round(budget.elapsed),
        "blur_sigma_max": config.oracle.blur_sigma_max,
        "decoded_fraction": config.oracle.decoded_fraction,
        "heldout_accuracy": oracle_accuracy(oracle, heldout),
        "heldout_accuracy_blur_sigma_1.5": oracle_accuracy(
            oracle, dataclasses.replace(heldout, images=blur_images(heldout.images, 1.5))
        ),
    }
    if vae is not None:
        metrics["heldout_accuracy_vae_reconstructions"] = oracle_accuracy(
            oracle, dataclasses.replace(heldout, images=vae_reconstructions(vae, heldout.images))
        )
    oracle.save(config.output)
    MetricsLog(config.output).record("oracle", metrics)
    return oracle


def decoded_training_images(config: TrainConfig, vae, images: np.ndarray) -> np.ndarray:
    """`vae_reconstructions` of the training images, cached under `cache_dir` (keyed by the VAE weights)."""
    key = sha256_file(shipped_vae_folder(config) / "diffusion_pytorch_model.safetensors")[:16]
    path = Path(config.cache_dir) / f"decoded_{key}_{len(images)}.npy"
    if path.is_file():
        return np.load(path)
    decoded = vae_reconstructions(vae, images)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path.with_suffix(".tmp.npy"), decoded)
    path.with_suffix(".tmp.npy").replace(path)
    return decoded


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """torchvision's Gaussian blur of images (..., C, H, W) with a kernel covering +-3 sigma."""
    from torchvision.transforms.functional import gaussian_blur as blur

    return blur(images, kernel_size=2 * int(np.ceil(3 * sigma)) + 1, sigma=sigma)


def random_blur(images: torch.Tensor, sigma_max: float, rng: np.random.Generator) -> torch.Tensor:
    """Blur a random half of images (B, 3, H, W), each with its own sigma ~ U(0, sigma_max)."""
    if sigma_max <= 0:
        return images
    images = images.clone()
    for row in np.nonzero(rng.random(len(images)) < 0.5)[0]:
        images[row] = gaussian_blur(images[row], float(rng.uniform(1e-3, sigma_max)))
    return images


def blur_images(images: np.ndarray, sigma: float) -> np.ndarray:
    """uint8 (N, H, W, 3) images blurred with one sigma (the held-out check of the oracle's robustness)."""
    tensor = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    blurred = gaussian_blur(tensor, sigma)
    return blurred.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def oracle_accuracy(oracle: ShapesOracle, scenes: SceneSet) -> dict[str, float]:
    """Accuracy per head on one-object scenes."""
    images = images_to_tensor(scenes.images)
    predictions = {name: [] for name in HEADS}
    for start in range(0, len(images), 256):
        logits = oracle(images[start : start + 256])
        for name in HEADS:
            predictions[name].append(logits[name].argmax(1))
    return {
        name: float((torch.cat(predictions[name]).numpy() == scenes.labels[name]).mean()) for name in HEADS
    }
