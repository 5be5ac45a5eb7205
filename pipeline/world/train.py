"""Train the shapes world's models: VAE, open_clip model, UNet + CLIP text encoder, and oracle.

    python -m pipeline.world.train {vae|vae-decoder|clip|unet|oracle|all|card} [--config jobs/train_shapes_world.yaml]

Every stage is seeded, renders its scenes in memory with `pipeline.world.generator`, stops at its step
count or its wall-time budget (whichever first), and records steps, wall time and held-out metrics in
`OUTPUT/train_metrics.json`; `card` rewrites MODEL_CARD.md (with sha256 of every weight file) from it.
The UNet stage trains on VAE latents cached once under `cache_dir`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from pipeline.training.fingerprints import sha256_file
from pipeline.world import generator
from pipeline.world.oracle import HEADS, ShapesOracle, images_to_tensor

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "jobs" / "train_shapes_world.yaml"
SD_FOLDER_NAME = "shapes-sd"
HELDOUT_SEED_OFFSET = 1_000_000  # held-out scenes use seeds disjoint from the training seeds
SCENE_CACHE_VERSION = 2  # bump when SceneSet gains fields, so stale caches are re-rendered


@dataclass(frozen=True)
class DataConfig:
    train_scenes: int
    heldout_scenes: int
    two_object_fraction: float
    heldout_captions: tuple[str, ...]


@dataclass(frozen=True)
class OracleConfig:
    """The oracle judges decoded images, which are softer than renders and carry the decoder's artefacts:
    decoded_fraction of each batch is replaced by the shipped VAE's reconstructions of the same scenes
    (decode(encode(x).mode()), labels unchanged), and half of the batch is then Gaussian-blurred with
    sigma ~ U(0, blur_sigma_max)."""

    widths: tuple[int, ...]
    steps: int
    batch: int
    lr: float
    max_minutes: float
    blur_sigma_max: float = 0.0
    decoded_fraction: float = 0.0


@dataclass(frozen=True)
class VAEConfig:
    channels: tuple[int, ...]
    steps: int
    batch: int
    lr: float
    kl_weight: float
    max_minutes: float


@dataclass(frozen=True)
class VAEDecoderConfig:
    steps: int
    batch: int
    lr: float
    max_minutes: float


@dataclass(frozen=True)
class ClipConfig:
    steps: int
    batch: int
    lr: float
    max_minutes: float


@dataclass(frozen=True)
class UNetConfig:
    channels: tuple[int, ...]
    attention_head_dim: int
    text_width: int
    text_layers: int
    text_heads: int
    text_intermediate: int
    train_text_encoder: bool
    steps: int
    batch: int
    lr: float
    caption_dropout: float
    ema_decay: float
    max_minutes: float
    scenes: int
    object_loss_weight: float
    min_snr_gamma: float | None


@dataclass(frozen=True)
class TrainConfig:
    seed: int
    output: str
    cache_dir: str
    threads: int
    data: DataConfig
    oracle: OracleConfig
    vae: VAEConfig
    vae_decoder: VAEDecoderConfig
    clip: ClipConfig
    unet: UNetConfig


def _build(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(values).__name__}")
    fields = {field.name: field for field in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    missing = set(fields) - set(values)
    if unknown or missing:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")
    kwargs = {}
    for name in fields:
        value = values[name]
        if isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def load_config(path: str | Path = DEFAULT_CONFIG) -> TrainConfig:
    """Read the training job YAML into a frozen TrainConfig (unknown or missing keys are errors)."""
    raw = yaml.safe_load(Path(path).read_text())
    sections = {
        "data": DataConfig,
        "oracle": OracleConfig,
        "vae": VAEConfig,
        "vae_decoder": VAEDecoderConfig,
        "clip": ClipConfig,
        "unet": UNetConfig,
    }
    values = dict(raw)
    for name, cls in sections.items():
        if name not in values:
            raise ValueError(f"{path}: missing section {name!r}")
        values[name] = _build(cls, values[name], f"{path}:{name}")
    config = _build(TrainConfig, values, str(path))
    for caption in config.data.heldout_captions:
        generator.parse_caption(caption)
    return config


def training_device() -> torch.device:
    """CUDA when available (the same job runs on a GPU), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Budget:
    """Stops a loop at `steps` or `max_minutes`; `progress` in [0, 1] is whichever is further along."""

    def __init__(self, steps: int, max_minutes: float) -> None:
        self.steps, self.seconds, self.start, self.step = steps, max_minutes * 60.0, time.time(), 0

    @property
    def elapsed(self) -> float:
        return time.time() - self.start

    def progress(self) -> float:
        return min(1.0, max(self.step / self.steps, self.elapsed / self.seconds))

    def running(self) -> bool:
        return self.progress() < 1.0

    def lr_factor(self, warmup_steps: int = 50) -> float:
        """Linear warm-up, then cosine decay to 5% over the budget."""
        warm = min(1.0, (self.step + 1) / warmup_steps)
        return warm * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * self.progress())))


@dataclass
class SceneSet:
    """Rendered scenes: images uint8 (N, 64, 64, 3), captions, labels (N,) per oracle head, n_objects (N,),
    object_masks bool (N, 64, 64): the union of the objects' silhouettes."""

    images: np.ndarray
    captions: list[str]
    labels: dict[str, np.ndarray]
    n_objects: np.ndarray
    object_masks: np.ndarray

    def head(self, count: int) -> SceneSet:
        """The first `count` scenes."""
        return SceneSet(
            self.images[:count],
            self.captions[:count],
            {name: values[:count] for name, values in self.labels.items()},
            self.n_objects[:count],
            self.object_masks[:count],
        )


def render_scenes(
    seeds: range, two_object_fraction: float, exclude: frozenset[str] = frozenset()
) -> SceneSet:
    """Render one scene per seed."""
    rendered = [
        generator.render(generator.sample_scene(seed, two_object_fraction, exclude_captions=exclude))
        for seed in seeds
    ]
    labels = {
        name: np.array([values.index(r.attributes[name]) for r in rendered]) for name, values in HEADS.items()
    }
    return SceneSet(
        images=np.stack([r.image for r in rendered]),
        captions=[r.caption for r in rendered],
        labels=labels,
        n_objects=np.array([r.attributes["n_objects"] for r in rendered]),
        object_masks=np.stack([r.masks.any(axis=0) for r in rendered]),
    )


def training_scenes(config: TrainConfig) -> SceneSet:
    """The training scenes, rendered once and cached under `cache_dir` (keyed by the data config)."""
    key = hashlib.sha256(repr((SCENE_CACHE_VERSION, config.data)).encode()).hexdigest()[:16]
    path = Path(config.cache_dir) / f"scenes_{key}.npz"
    if path.is_file():
        cached = np.load(path)
        labels = {name: cached[f"label_{name}"] for name in HEADS}
        return SceneSet(
            cached["images"], cached["captions"].tolist(), labels, cached["n_objects"], cached["object_masks"]
        )
    scenes = render_scenes(
        range(config.data.train_scenes),
        config.data.two_object_fraction,
        frozenset(config.data.heldout_captions),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = {f"label_{name}": values for name, values in scenes.labels.items()}
    np.savez(path.with_suffix(".tmp.npz"), images=scenes.images, captions=np.array(scenes.captions),
             n_objects=scenes.n_objects, object_masks=scenes.object_masks, **labels)  # fmt: skip
    path.with_suffix(".tmp.npz").replace(path)
    return scenes


def heldout_scenes(config: TrainConfig, two_object_fraction: float | None = None) -> SceneSet:
    fraction = config.data.two_object_fraction if two_object_fraction is None else two_object_fraction
    seeds = range(HELDOUT_SEED_OFFSET, HELDOUT_SEED_OFFSET + config.data.heldout_scenes)
    return render_scenes(seeds, fraction)


def _record(config: TrainConfig, stage: str, metrics: dict) -> None:
    path = Path(config.output) / "train_metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = json.loads(path.read_text()) if path.is_file() else {}
    record[stage] = metrics
    path.write_text(json.dumps(record, indent=2, sort_keys=True))
    print(f"[{stage}] {json.dumps(metrics)}", flush=True)


def _forget(config: TrainConfig, stage: str) -> None:
    """Drop `stage`'s record from train_metrics.json (its weights are gone)."""
    path = Path(config.output) / "train_metrics.json"
    if path.is_file():
        record = json.loads(path.read_text())
        if record.pop(stage, None) is not None:
            path.write_text(json.dumps(record, indent=2, sort_keys=True))


def _log(stage: str, budget: Budget, loss: float, every: int = 50) -> None:
    if budget.step % every == 0:
        print(f"[{stage}] step {budget.step} loss {loss:.5f} t={budget.elapsed:.0f}s", flush=True)


# ----------------------------------------------------------------------------------------------- oracle
def train_oracle(config: TrainConfig) -> ShapesOracle:
    """Train the attribute classifier on one-object scenes; report held-out accuracy per head.

    With `oracle.decoded_fraction` > 0 it needs the shipped VAE (OUTPUT/shapes-sd/vae, written by the
    unet stage): part of every batch is that VAE's reconstruction of the batch's scenes.
    """
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
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
    budget = Budget(config.oracle.steps, config.oracle.max_minutes)
    while budget.running():
        index = rng.choice(one, config.oracle.batch)
        images = images_to_tensor(data.images[index])
        if decoded is not None:
            swap = rng.random(len(index)) < config.oracle.decoded_fraction
            images[swap] = images_to_tensor(decoded[index[swap]])
        images = random_blur(images, config.oracle.blur_sigma_max, rng)
        logits = oracle(images.to(device))
        loss = sum(
            F.cross_entropy(logits[name], torch.as_tensor(data.labels[name][index], device=device))
            for name in HEADS
        )
        for group in optimizer.param_groups:
            group["lr"] = config.oracle.lr * budget.lr_factor()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        budget.step += 1
        _log("oracle", budget, loss.item())
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
    _record(config, "oracle", metrics)
    return oracle


def shipped_vae_folder(config: TrainConfig) -> Path:
    """OUTPUT/shapes-sd/vae: the VAE that the unet stage ships with the diffusers folder."""
    return Path(config.output) / SD_FOLDER_NAME / "vae"


def shipped_vae(config: TrainConfig):
    """The VAE of the shipped diffusers folder, in eval mode on the CPU."""
    from diffusers import AutoencoderKL

    folder = shipped_vae_folder(config)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"no VAE in {folder}: the oracle stage with oracle.decoded_fraction > 0 reads the shipped VAE; "
            "run the vae, vae-decoder and unet stages first, or set decoded_fraction: 0"
        )
    return load_in_memory(AutoencoderKL, folder).eval()


@torch.no_grad()
def vae_reconstructions(vae, images: np.ndarray) -> np.ndarray:
    """decode(encode(x).mode()) of uint8 images (N, 64, 64, 3), as uint8 (N, 64, 64, 3)."""
    decoded = []
    for start in range(0, len(images), 256):
        latents = vae.encode(images_to_tensor(images[start : start + 256])).latent_dist.mode()
        pixels = (vae.decode(latents).sample.clamp(-1, 1) + 1) * 127.5
        decoded.append(pixels.round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.concatenate(decoded)


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


# ----------------------------------------------------------------------------------------------- VAE
def _sd_architecture(config: TrainConfig):
    from pipeline.models.build import SDArchitecture

    unet = config.unet
    return SDArchitecture(
        image_size=generator.IMAGE_SIZE,
        vae_channels=config.vae.channels,
        unet_channels=unet.channels,
        unet_attention_head_dim=unet.attention_head_dim,
        text_width=unet.text_width,
        text_layers=unet.text_layers,
        text_heads=unet.text_heads,
        text_intermediate=unet.text_intermediate,
    )


def train_vae(config: TrainConfig):
    """Train AutoencoderKL 64x64x3 -> 16x16x4 (MSE + L1 + small KL); set scaling_factor to unit latent std."""
    from pipeline.models.build import build_vae

    torch.manual_seed(config.seed + 1)
    rng = np.random.default_rng(config.seed + 1)
    data = training_scenes(config)
    device = training_device()
    vae = build_vae(_sd_architecture(config)).to(device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae.lr, weight_decay=0.0)
    budget = Budget(config.vae.steps, config.vae.max_minutes)
    while budget.running():
        images = images_to_tensor(data.images[rng.choice(len(data.images), config.vae.batch)]).to(device)
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        kl = posterior.kl().mean() / images[0].numel()
        loss = (
            F.mse_loss(reconstruction, images) + F.l1_loss(reconstruction, images) + config.vae.kl_weight * kl
        )
        for group in optimizer.param_groups:
            group["lr"] = config.vae.lr * budget.lr_factor()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        budget.step += 1
        _log("vae", budget, loss.item())
    vae.cpu().eval()
    scaling = latent_scaling_factor(vae, data.images[:2048])
    vae.register_to_config(scaling_factor=scaling)
    psnr = vae_psnr(vae, heldout_scenes(config).images)
    vae.save_pretrained(Path(config.cache_dir) / "vae", safe_serialization=True)
    _forget(config, "vae_decoder")  # its decoder was fine-tuned for the previous encoder
    _record(
        config,
        "vae",
        {
            "steps": budget.step,
            "wall_s": round(budget.elapsed),
            "heldout_psnr_db": psnr,
            "scaling_factor": scaling,
        },
    )
    return vae


def train_vae_decoder(config: TrainConfig):
    """Fine-tune only the VAE's decoder (post_quant_conv + decoder) for reconstruction.

    The encoder, and so the latent space the UNet learns, is untouched: this stage may run before, during
    or after the UNet stage, which saves whichever decoder is in the cache when it finishes.
    """
    from diffusers import AutoencoderKL

    device = training_device()
    torch.manual_seed(config.seed + 4)
    rng = np.random.default_rng(config.seed + 4)
    data = training_scenes(config)
    folder = Path(config.cache_dir) / "vae"
    vae = AutoencoderKL.from_pretrained(folder).to(device)
    vae.requires_grad_(False)
    parameters = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(parameters, lr=config.vae_decoder.lr, weight_decay=0.0)
    budget = Budget(config.vae_decoder.steps, config.vae_decoder.max_minutes)
    while budget.running():
        images = images_to_tensor(data.images[rng.choice(len(data.images), config.vae_decoder.batch)]).to(
            device
        )
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.sample()
        reconstruction = vae.decode(latents).sample
        loss = F.mse_loss(reconstruction, images) + F.l1_loss(reconstruction, images)
        for group in optimizer.param_groups:
            group["lr"] = config.vae_decoder.lr * budget.lr_factor()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        budget.step += 1
        _log("vae-decoder", budget, loss.item())
    vae.cpu().eval()
    psnr = vae_psnr(vae, heldout_scenes(config).images)
    staging = folder.with_name("vae.staging")
    vae.save_pretrained(staging, safe_serialization=True)
    shutil.rmtree(folder)
    staging.rename(folder)
    _record(
        config,
        "vae_decoder",
        {"steps": budget.step, "wall_s": round(budget.elapsed), "heldout_psnr_db": psnr},
    )
    return vae


def load_in_memory(model_class, folder: Path):
    """`model_class.from_pretrained(folder)` with its weights copied off the file: safetensors maps the
    file into memory, and the stage later writes the same folder (a mapped file rewritten under a live
    model is a bus error)."""
    return copy.deepcopy(model_class.from_pretrained(folder))


def _reload_vae_same_encoder(vae_folder: Path, vae):
    """The VAE in `vae_folder` as it is now, checked to have the encoder the latents came from."""
    from diffusers import AutoencoderKL

    current = load_in_memory(AutoencoderKL, vae_folder).eval()
    for part in ("encoder", "quant_conv"):
        old, new = getattr(vae, part).state_dict(), getattr(current, part).state_dict()
        if any(not torch.equal(old[key].cpu(), new[key]) for key in old):
            raise RuntimeError(f"the VAE's {part} changed during UNet training; re-run the unet stage")
    if current.config.scaling_factor != vae.config.scaling_factor:
        raise RuntimeError("the VAE's scaling_factor changed during UNet training; re-run the unet stage")
    return current


@torch.no_grad()
def latent_scaling_factor(vae, images: np.ndarray) -> float:
    """1 / std of posterior samples: SD's convention that scaled latents have ~unit variance."""
    torch.manual_seed(0)
    latents = torch.cat(
        [
            vae.encode(images_to_tensor(images[s : s + 256])).latent_dist.sample()
            for s in range(0, len(images), 256)
        ]
    )
    return float(1.0 / latents.std())


@torch.no_grad()
def vae_psnr(vae, images: np.ndarray) -> float:
    """Mean PSNR (dB, on 0..255 pixels) of decode(encode(x).mode()) over `images` (N, 64, 64, 3) uint8."""
    from pipeline.metrics.pixel import psnr

    def unit(pixels: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0

    return float(psnr(unit(vae_reconstructions(vae, images)), unit(images)).mean())


# ----------------------------------------------------------------------------------------------- CLIP
def train_clip(config: TrainConfig):
    """Train the tiny open_clip model contrastively; identical captions in a batch count as positives."""
    import open_clip
    from safetensors.torch import save_file

    from pipeline.world.clip_model import SHAPES_CLIP_NAME, SHAPES_CLIP_WEIGHTS, register_shapes_clip

    torch.manual_seed(config.seed + 2)
    rng = np.random.default_rng(config.seed + 2)
    data = training_scenes(config)
    register_shapes_clip()
    device = training_device()
    model, _, _ = open_clip.create_model_and_transforms(SHAPES_CLIP_NAME, device=device)
    tokenizer = open_clip.get_tokenizer(SHAPES_CLIP_NAME)
    tokens = tokenizer(data.captions)
    caption_ids = np.unique(np.array(data.captions), return_inverse=True)[1]
    normalize = _clip_normalizer(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.clip.lr, weight_decay=0.05)
    budget = Budget(config.clip.steps, config.clip.max_minutes)
    model.train()
    while budget.running():
        index = rng.choice(len(data.images), config.clip.batch, replace=False)
        image_features, text_features, logit_scale = model(
            normalize(data.images[index]).to(device), tokens[torch.as_tensor(index)].to(device)
        )[:3]
        logits = logit_scale * image_features @ text_features.T
        same = torch.as_tensor(
            caption_ids[index][:, None] == caption_ids[index][None, :], dtype=torch.float32
        )
        targets = same / same.sum(1, keepdim=True)
        loss = 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))
        for group in optimizer.param_groups:
            group["lr"] = config.clip.lr * budget.lr_factor()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        budget.step += 1
        _log("clip", budget, loss.item())
    model.cpu().eval()
    accuracy = clip_caption_accuracy(model, tokenizer, heldout_scenes(config, two_object_fraction=0.0))
    SHAPES_CLIP_WEIGHTS.parent.mkdir(parents=True, exist_ok=True)
    weights = Path(config.output) / SHAPES_CLIP_WEIGHTS.name
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, weights)
    _record(config, "clip", {"steps": budget.step, "wall_s": round(budget.elapsed), **accuracy})
    return model


def _clip_normalizer(model):
    """uint8 (B, 64, 64, 3) -> normalised float (B, 3, 64, 64) exactly as open_clip's preprocess does."""
    mean = torch.tensor(model.visual.preprocess_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.visual.preprocess_cfg["std"]).view(1, 3, 1, 1)

    def normalize(images: np.ndarray) -> torch.Tensor:
        return (torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255.0 - mean) / std

    return normalize


@torch.no_grad()
def clip_caption_accuracy(model, tokenizer, scenes: SceneSet) -> dict[str, float]:
    """Top-1 accuracy of picking each one-object image's caption among all 144 one-object captions."""
    import itertools

    captions = [
        generator.one_object_caption(color, shape, background)
        for color, shape, background in itertools.product(
            generator.COLORS, generator.SHAPES, generator.BACKGROUNDS
        )
    ]
    text = model.encode_text(tokenizer(captions), normalize=True)
    image = model.encode_image(_clip_normalizer(model)(scenes.images), normalize=True)
    chosen = (image @ text.T).argmax(1).tolist()
    correct = [captions[choice] == caption for choice, caption in zip(chosen, scenes.captions, strict=True)]
    return {"heldout_caption_top1_of_144": float(np.mean(correct))}


# ----------------------------------------------------------------------------------------------- UNet
def ddpm_scheduler():
    """SD's training noise schedule: scaled_linear betas 0.00085..0.012 over 1000 steps, epsilon target."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", clip_sample=False,
    )  # fmt: skip


@torch.no_grad()
def cache_latents(config: TrainConfig, vae, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every training image, (N, 4, 16, 16) each; cached on disk."""
    path = Path(config.cache_dir) / f"latents_{config.seed}_{len(images)}_{vae.config.scaling_factor:.6f}.pt"
    if path.is_file():
        cached = torch.load(path)
        return cached["mean"], cached["std"]
    means, stds = [], []
    for start in range(0, len(images), 256):
        posterior = vae.encode(images_to_tensor(images[start : start + 256]).to(vae.device)).latent_dist
        means.append(posterior.mean.cpu())
        stds.append(posterior.std.cpu())
    mean, std = torch.cat(means), torch.cat(stds)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"mean": mean, "std": std}, path)
    return mean, std


def object_loss_weights(object_masks: np.ndarray, latent_size: int, object_weight: float) -> torch.Tensor:
    """Per-latent-pixel loss weights (N, 1, h, w): 1 + object_weight * (fraction of the pixel on an object).

    Objects cover a small part of each scene, so an unweighted loss is dominated by the background (and
    the textured backgrounds are the hardest part to fit); weighting the objects makes shape and colour,
    which the captions name, a larger share of the gradient.
    """
    masks = torch.as_tensor(object_masks, dtype=torch.float32)[:, None]
    coverage = F.adaptive_avg_pool2d(masks, latent_size)
    return 1.0 + object_weight * coverage


def diffusion_loss(
    prediction: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler,
    weights: torch.Tensor,
    min_snr_gamma: float | None,
) -> torch.Tensor:
    """Weighted epsilon-prediction loss.

    mean_b [ min(SNR_t, gamma) / SNR_t * mean_(c,h,w) weights * (eps_theta - eps)^2 ], with
    SNR_t = alpha_bar_t / (1 - alpha_bar_t) (Min-SNR-gamma weighting, Hang et al. 2023, for epsilon
    targets; gamma None gives weight 1 at every t).

    Args:
        prediction: eps_theta, (B, C, h, w).
        noise: eps, (B, C, h, w).
        timesteps: t, (B,).
        scheduler: the training DDPMScheduler (its alphas_cumprod).
        weights: per-pixel weights, broadcastable to (B, C, h, w).
        min_snr_gamma: gamma, or None.
    """
    per_sample = (weights * (prediction - noise).pow(2)).mean(dim=(1, 2, 3))
    if min_snr_gamma is not None:
        alpha_bar = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
        snr = alpha_bar / (1.0 - alpha_bar)
        per_sample = per_sample * snr.clamp(max=min_snr_gamma) / snr
    return per_sample.mean()


def train_unet(config: TrainConfig, resume: bool = False) -> Path:
    """Train UNet + CLIP text encoder on cached latents (epsilon, caption dropout); save the SD folder.

    Args:
        config: the training job.
        resume: start from the UNet and text encoder already saved in OUTPUT/shapes-sd (continue training
            with a fresh step/time budget) instead of from random weights.
    """
    from diffusers import AutoencoderKL

    from pipeline.models.build import build_text_encoder, build_unet, save_sd_folder, write_clip_tokenizer

    torch.manual_seed(config.seed + 3)
    rng = np.random.default_rng(config.seed + 3)
    device = training_device()
    # Resuming keeps the VAE whose latents the saved UNet learned; a fresh run takes the vae stage's.
    vae_folder = Path(config.output) / SD_FOLDER_NAME / "vae" if resume else Path(config.cache_dir) / "vae"
    vae = load_in_memory(AutoencoderKL, vae_folder).to(device).eval()
    data = training_scenes(config)
    # The first `unet.scenes` training scenes: encoding them all would take much of the UNet's budget.
    data = data.head(config.unet.scenes)
    latent_mean, latent_std = cache_latents(config, vae, data.images)
    loss_weights = object_loss_weights(
        data.object_masks, latent_mean.shape[-1], config.unet.object_loss_weight
    )
    scaling = float(vae.config.scaling_factor)
    arch = _sd_architecture(config)
    tokenizer = write_clip_tokenizer(Path(config.cache_dir) / "tokenizer", arch.max_length)
    text_encoder = build_text_encoder(arch, vocab_size=len(tokenizer))
    unet = build_unet(arch)
    previous = {"steps": 0, "wall_s": 0}
    if resume:
        unet, text_encoder, previous = _resume_from(config, unet, text_encoder)
    text_encoder, unet = text_encoder.to(device), unet.to(device)
    tokens = tokenizer(
        data.captions, padding="max_length", max_length=arch.max_length, return_tensors="pt"
    ).input_ids
    empty = tokenizer([""], padding="max_length", max_length=arch.max_length, return_tensors="pt").input_ids
    scheduler = ddpm_scheduler()
    parameters = list(unet.parameters()) + (
        list(text_encoder.parameters()) if config.unet.train_text_encoder else []
    )
    text_encoder.requires_grad_(config.unet.train_text_encoder)
    optimizer = torch.optim.AdamW(parameters, lr=config.unet.lr, weight_decay=1e-2)
    ema = {name: module.state_dict() for name, module in (("unet", unet), ("text", text_encoder))}
    ema = {name: {key: value.detach().clone() for key, value in state.items()} for name, state in ema.items()}
    budget = Budget(config.unet.steps, config.unet.max_minutes)
    unet.train()
    text_encoder.train(config.unet.train_text_encoder)
    while budget.running():
        index = torch.as_tensor(rng.choice(len(latent_mean), config.unet.batch))
        latents = (latent_mean[index] + latent_std[index] * torch.randn_like(latent_std[index])) * scaling
        latents = latents.to(device)
        batch_tokens = tokens[index].clone()
        dropped = torch.as_tensor(rng.random(len(index)) < config.unet.caption_dropout)
        batch_tokens[dropped] = empty
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(index),)).to(device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, text_encoder(batch_tokens.to(device))[0]).sample
        loss = diffusion_loss(
            prediction, noise, timesteps, scheduler, loss_weights[index].to(device), config.unet.min_snr_gamma
        )
        for group in optimizer.param_groups:
            group["lr"] = config.unet.lr * budget.lr_factor(warmup_steps=100)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        budget.step += 1
        _update_ema(
            ema, unet, text_encoder, min(config.unet.ema_decay, (1 + budget.step) / (10 + budget.step))
        )
        _log("unet", budget, loss.item(), every=25)
    unet.load_state_dict(ema["unet"])
    text_encoder.load_state_dict(ema["text"])
    unet, text_encoder, vae = unet.cpu(), text_encoder.cpu(), vae.cpu()
    # Re-read the VAE: the vae-decoder stage may have improved its decoder meanwhile (same encoder).
    vae = _reload_vae_same_encoder(vae_folder, vae)
    folder = save_sd_folder(
        Path(config.output) / SD_FOLDER_NAME, unet.eval(), vae, text_encoder.eval(), tokenizer, arch.scheduler
    )
    _record(
        config,
        "unet",
        {
            "steps": budget.step,
            "wall_s": round(budget.elapsed),
            "batch": config.unet.batch,
            "peak_lr": config.unet.lr,
            "final_loss": round(loss.item(), 5),
            "unet_parameters": sum(p.numel() for p in unet.parameters()),
            "text_encoder_parameters": sum(p.numel() for p in text_encoder.parameters()),
            "train_text_encoder": config.unet.train_text_encoder,
            "resumed_after_steps": previous["steps"],
            "total_steps": previous["steps"] + budget.step,
            "total_wall_s": previous["wall_s"] + round(budget.elapsed),
        },
    )
    return folder


def _resume_from(config: TrainConfig, unet, text_encoder):
    """Weights of the saved UNet and text encoder (their architecture must match), and the steps and wall
    seconds they were trained for so far."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = Path(config.output) / SD_FOLDER_NAME
    if not (folder / "unet").is_dir():
        raise FileNotFoundError(f"--resume: no saved model in {folder}; train without --resume first")
    saved_unet = load_in_memory(UNet2DConditionModel, folder / "unet")
    saved_text = load_in_memory(CLIPTextModel, folder / "text_encoder")
    if tuple(saved_unet.config.block_out_channels) != tuple(unet.config.block_out_channels):
        raise ValueError(
            f"--resume: saved UNet has channels {saved_unet.config.block_out_channels}, the job asks for "
            f"{unet.config.block_out_channels}; use the same unet.channels or train afresh"
        )
    record = json.loads((Path(config.output) / "train_metrics.json").read_text()).get("unet", {})
    previous = {
        "steps": int(record.get("total_steps", record.get("steps", 0))),
        "wall_s": int(record.get("total_wall_s", record.get("wall_s", 0))),
    }
    return saved_unet, saved_text, previous


@torch.no_grad()
def _update_ema(ema: dict, unet, text_encoder, decay: float) -> None:
    for name, module in (("unet", unet), ("text", text_encoder)):
        for key, value in module.state_dict().items():
            if value.dtype.is_floating_point:
                ema[name][key].mul_(decay).add_(value.detach(), alpha=1 - decay)
            else:
                ema[name][key].copy_(value)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("stage", choices=["oracle", "vae", "vae-decoder", "clip", "unet", "all", "card"])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="training job YAML")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the config's)")
    parser.add_argument(
        "--resume", action="store_true", help="unet: continue from OUTPUT/shapes-sd's weights"
    )
    parser.add_argument(
        "--lr", type=float, default=None, help="unet: peak learning rate (default: the config's)"
    )
    parser.add_argument(
        "--max-minutes", type=float, default=None, help="unet: wall-time budget (default: the config's)"
    )
    args = parser.parse_args(argv)
    config = load_config(args.config)
    unet_overrides = {"lr": args.lr, "max_minutes": args.max_minutes}
    unet_overrides = {key: value for key, value in unet_overrides.items() if value is not None}
    if unet_overrides:
        config = dataclasses.replace(config, unet=dataclasses.replace(config.unet, **unet_overrides))
    torch.set_num_threads(args.threads or config.threads)
    # The oracle comes last: it learns to read images decoded by the VAE that the unet stage ships.
    stages = {
        "vae": train_vae,
        "vae-decoder": train_vae_decoder,
        "clip": train_clip,
        "unet": train_unet,
        "oracle": train_oracle,
    }
    order = list(stages) if args.stage == "all" else [] if args.stage == "card" else [args.stage]
    for name in order:
        if name == "unet":
            train_unet(config, resume=args.resume)
        else:
            stages[name](config)
    from pipeline.world.model_card import write_model_card

    write_model_card(Path(config.output), args.config)


if __name__ == "__main__":
    main()
