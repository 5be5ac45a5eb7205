"""The shapes world's training job (`jobs/train_shapes_world.yaml`) as typed, frozen dataclasses.

Read with the job spec's YAML machinery (`pipeline.config`): unknown keys, missing keys and wrong
types raise `ConfigError` naming the file and the dotted key; `--set dotted.key=value` overrides any key.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline.config import ConfigError, apply_override, build_dataclass, load_raw
from pipeline.world import broad, generator

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "jobs" / "train_shapes_world.yaml"


# The class name is part of the scene cache key (`world_data.training_scenes` hashes its repr).
@dataclass(frozen=True)
class DataConfig:
    """The rendered scenes.

    Attributes:
        train_scenes: training scenes, seeds 0..train_scenes-1.
        heldout_scenes: held-out scenes, seeds from `world_data.HELDOUT_SEED_OFFSET`.
        two_object_fraction: fraction of scenes with two objects.
        heldout_captions: one-object captions never rendered for training.
    """

    train_scenes: int
    heldout_scenes: int
    two_object_fraction: float
    heldout_captions: tuple[str, ...]


@dataclass(frozen=True)
class OracleConfig:
    """The attribute classifier.

    The oracle judges decoded images, which are softer than renders and carry the decoder's artefacts:
    decoded_fraction of each batch is replaced by the shipped VAE's reconstructions of the same scenes
    (decode(encode(x).mode()), labels unchanged), and half of the batch is then Gaussian-blurred with
    sigma ~ U(0, blur_sigma_max).

    Attributes:
        widths: channels of the four convolution blocks.
        steps: step budget.
        batch: scenes per step.
        lr: peak learning rate.
        max_minutes: wall-time budget.
        blur_sigma_max: largest blur sigma of the augmentation (0: no blur).
        decoded_fraction: fraction of each batch replaced by VAE reconstructions.
    """

    widths: tuple[int, ...]
    steps: int
    batch: int
    lr: float
    max_minutes: float
    blur_sigma_max: float = 0.0
    decoded_fraction: float = 0.0


def _check_backgrounds(section: str, backgrounds: tuple[str, ...]) -> None:
    unknown = sorted(set(backgrounds) - set(broad.BROAD_BACKGROUNDS))
    if unknown or not backgrounds:
        raise ValueError(
            f"{section}.backgrounds must name kinds among {list(broad.BROAD_BACKGROUNDS)} "
            f"(a kind twice to draw it twice as often), got {list(backgrounds)}"
        )


def _check_frequency_weight(section: str, weight: float) -> None:
    if not weight >= 0.0:
        raise ValueError(
            f"{section}.frequency_weight must be >= 0 (0 turns the focal frequency loss off), got {weight}"
        )


@dataclass(frozen=True)
class VAEConfig:
    """The AutoencoderKL trained from scratch.

    Attributes:
        channels: block widths (64x64 pixels -> 16x16 latents with three blocks).
        steps: step budget.
        batch: scenes per step.
        lr: peak learning rate.
        kl_weight: weight of the KL term (per pixel).
        max_minutes: wall-time budget.
        latent_channels: channels of the latent z (SD 1.5: 4; SD3 and FLUX: 16). The UNet stage builds
            its UNet for the channels of the VAE it learns on.
        world_fraction: share of each batch drawn from the world's training scenes; the rest are
            off-palette scenes (`pipeline.world.broad`), fresh every step. 1 trains on the world alone.
        near_fraction: share of each batch drawn from `broad.near_scene` (the rest of the off-palette
            share from `broad.broad_scene`, all background kinds).
        frequency_weight: weight of the focal frequency loss (Jiang et al., ICCV 2021) added to the
            reconstruction's MSE + L1: it weights each spatial frequency by its current error, so the
            frequencies a blurred reconstruction misses (stripes, edges) are pushed hardest. 0: off.
        widen: with `--resume`, multiplies every block width of the cached VAE (whose widths `channels`
            names) before training on, keeping the function it computes (`pipeline.models.widen`): more
            capacity for the encoder and decoder, from the same reconstructions and latent space. 1: the
            cached widths as they are.
        latent_widen: with `--resume`, multiplies the cached VAE's latent channels (which
            `latent_channels` names) before training on: fresh channels that nothing reads yet, so the
            decoded image is kept (`pipeline.models.widen.widen_latent`); a code with more numbers per
            cell, as SD3's and FLUX's. The latent space changes, so the UNet must be retrained. 1: the
            cached code as it is.
        backgrounds: the background kinds of the broad training scenes, each drawn with equal chance
            (name a kind twice to draw it twice as often: the periodic kinds hold the worst held-out
            scenes); the held-out broad scenes always use all kinds once.
    """

    channels: tuple[int, ...]
    steps: int
    batch: int
    lr: float
    kl_weight: float
    max_minutes: float
    latent_channels: int = 4
    world_fraction: float = 1.0
    near_fraction: float = 0.0
    frequency_weight: float = 0.0
    widen: int = 1
    latent_widen: int = 1
    backgrounds: tuple[str, ...] = broad.BROAD_BACKGROUNDS

    def __post_init__(self) -> None:
        _check_frequency_weight("vae", self.frequency_weight)
        _check_backgrounds("vae", self.backgrounds)
        if self.widen < 1:
            raise ValueError(
                f"vae.widen must be an integer >= 1 (1 keeps the cached VAE's widths), got {self.widen}"
            )
        if self.latent_widen < 1:
            raise ValueError(
                "vae.latent_widen must be an integer >= 1 (1 keeps the cached VAE's latent channels), "
                f"got {self.latent_widen}"
            )
        if self.latent_channels < 1:
            raise ValueError(
                f"vae.latent_channels must be an integer >= 1 (SD: 4), got {self.latent_channels}"
            )
        if not (
            self.near_fraction >= 0.0
            and self.world_fraction >= 0.0
            and self.world_fraction + self.near_fraction <= 1.0
        ):
            raise ValueError(
                "vae.world_fraction and vae.near_fraction must be >= 0 with a sum <= 1 (the rest are broad "
                f"scenes), got {self.world_fraction} and {self.near_fraction}"
            )


@dataclass(frozen=True)
class VAEDecoderConfig:
    """Decoder-only fine-tuning of the VAE.

    Attributes:
        steps: step budget.
        batch: scenes per step.
        lr: peak learning rate.
        max_minutes: wall-time budget.
        frequency_weight: weight of the focal frequency loss added to MSE + L1 (as `vae.frequency_weight`).
    """

    steps: int
    batch: int
    lr: float
    max_minutes: float
    frequency_weight: float = 0.0

    def __post_init__(self) -> None:
        _check_frequency_weight("vae_decoder", self.frequency_weight)


@dataclass(frozen=True)
class VAEBroadConfig:
    """Fine-tuning the shipped VAE to reconstruct any image while keeping the UNet's latent space.

    Each batch mixes the world's training scenes with off-palette scenes (`pipeline.world.broad`); the
    loss is the reconstruction (MSE + L1) of all of them plus `anchor_weight` times the squared distance,
    in scaled latent units, between the encoder's posterior mean on the world's scenes and the shipped
    encoder's. The anchor is what lets the UNet, trained on the shipped encoder's latents, keep working.

    Attributes:
        steps: step budget.
        batch: scenes per step.
        world_fraction: share of each batch drawn from the world's training scenes.
        near_fraction: share drawn from `broad.near_scene` (the rest from `broad.broad_scene`).
        lr: peak learning rate.
        anchor_weight: weight of the latent anchor.
        max_minutes: wall-time budget.
        heldout_scenes: held-out scenes per family the stage scores.
        widen: multiplies every block width of the shipped VAE before fine-tuning, keeping the function
            it computes (`pipeline.models.widen`); 1 fine-tunes the shipped architecture as it is.
        backgrounds: the background kinds of the broad training scenes, each drawn with equal chance
            (name a kind twice to draw it twice as often); the held-out broad scenes always use all
            kinds once.
        frequency_weight: weight of the focal frequency loss added to MSE + L1 (as `vae.frequency_weight`).
    """

    steps: int
    batch: int
    world_fraction: float
    near_fraction: float
    lr: float
    anchor_weight: float
    max_minutes: float
    heldout_scenes: int
    widen: int = 1
    backgrounds: tuple[str, ...] = broad.BROAD_BACKGROUNDS
    frequency_weight: float = 0.0

    def __post_init__(self) -> None:
        _check_frequency_weight("vae_broad", self.frequency_weight)
        if self.widen < 1:
            raise ValueError(
                f"vae_broad.widen must be an integer >= 1 (1 keeps the shipped widths), got {self.widen}"
            )
        _check_backgrounds("vae_broad", self.backgrounds)


@dataclass(frozen=True)
class ClipConfig:
    """The tiny open_clip model.

    Attributes:
        steps: step budget.
        batch: scenes per step (drawn without replacement).
        lr: peak learning rate.
        max_minutes: wall-time budget.
        counterfactual_fraction: the share of each batch's scenes that also enter it with one attribute
            changed (shape, colour or background; the rest of the scene kept), as hard negatives whose
            captions differ from their source's by one word (0 for the shipped metric CLIP).
        resized_fraction: the share of each batch's scenes that also enter it with their first object
            resized (radius x 0.6 to 1.0) and moved, under the same caption: positives that teach the model
            that size and place are not in the caption (0 for the shipped metric CLIP).
        wobbly_fraction: the share of each batch's scenes that also enter it with their first object's
            outline bent by smooth low-order harmonics and its colour mottled, under the same caption:
            positives that teach the model that a dented, blotchy triangle is still a triangle (0 for the
            shipped CLIPs).
        architecture: an open_clip model config JSON (registered under its file stem) to train instead
            of the shipped `shapes-clip-vit-tiny`, e.g. a finer patch grid; editors name the same file as
            their `clip.model_config`.
        output_name: the weights file OUTPUT/{output_name}.safetensors and its train_metrics.json record,
            for a second CLIP of a stage beside the shipped one (e.g. `shapes_clip_guide_p4`); None = the
            stage's own (`shapes_clip` / `clip`, `shapes_clip_guide` / `clip_guide`).
        save_dtype: float32, or float16 to store the weights at half the size (they load as float32;
            the held-out accuracy is measured on the stored, rounded weights).
    """

    steps: int
    batch: int
    lr: float
    max_minutes: float
    counterfactual_fraction: float = 0.0
    resized_fraction: float = 0.0
    wobbly_fraction: float = 0.0
    architecture: str | None = None
    output_name: str | None = None
    save_dtype: Literal["float32", "float16"] = "float32"

    def __post_init__(self) -> None:
        for name in ("counterfactual_fraction", "resized_fraction", "wobbly_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"clip.{name} must be in [0, 1], got {getattr(self, name)}")


@dataclass(frozen=True)
class UNetConfig:
    """The UNet and its CLIP text encoder.

    Attributes:
        channels: UNet block widths.
        attention_head_dim: UNet attention head size.
        text_width: text encoder hidden size.
        text_layers: text encoder layers.
        text_heads: text encoder attention heads.
        text_intermediate: text encoder MLP size.
        train_text_encoder: train the text encoder with the UNet (else it stays random).
        steps: step budget.
        batch: latents per step.
        lr: peak learning rate.
        caption_dropout: probability of replacing a caption by the empty one.
        ema_decay: decay of the weights' exponential moving average (the saved weights).
        max_minutes: wall-time budget.
        scenes: the first `scenes` training scenes are encoded and trained on.
        object_loss_weight: loss weight 1 + object_loss_weight * coverage on latent pixels.
        min_snr_gamma: Min-SNR-gamma of the loss weighting; null for plain epsilon MSE.
        plain_levels: how many top (highest-resolution) UNet levels have no attention (SDXL's layout has
            one); 0 gives every level but the lowest cross-attention. A 32x32 latent grid's top-level
            self-attention over 1,024 positions is most of a step's cost.
    """

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
    plain_levels: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.plain_levels < len(self.channels):
            raise ValueError(
                f"unet.plain_levels must be an integer from 0 to {len(self.channels) - 1} (one less than the "
                f"levels in unet.channels: the lowest level never attends), got {self.plain_levels}"
            )


@dataclass(frozen=True)
class TrainConfig:
    """The whole job.

    Attributes:
        seed: base seed; each stage seeds torch and numpy with seed + its own offset.
        output: folder of the shipped models and train_metrics.json.
        cache_dir: rendered scenes, latents, the VAE between stages, the tokenizer.
        threads: torch threads (the CLI's --threads overrides it).
        data: the scenes.
        oracle: the oracle stage.
        vae: the vae stage.
        vae_decoder: the vae-decoder stage.
        vae_broad: the vae-broad stage.
        clip: the clip stage (the metric CLIP, `shapes_clip.safetensors`).
        clip_guide: the clip-guide stage (the same architecture trained longer with counterfactual hard
            negatives and resized positives, `shapes_clip_guide.safetensors`: the direction loss of
            trained editors).
        unet: the unet stage.
    """

    seed: int
    output: str
    cache_dir: str
    threads: int
    data: DataConfig
    oracle: OracleConfig
    vae: VAEConfig
    vae_decoder: VAEDecoderConfig
    vae_broad: VAEBroadConfig
    clip: ClipConfig
    clip_guide: ClipConfig
    unet: UNetConfig


def load_train_config(path: str | Path = DEFAULT_CONFIG, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read the training job YAML into a frozen TrainConfig.

    Args:
        path: the job file (or `env:NAME`, as for job specs).
        overrides: `dotted.key=value` assignments applied before checking (values parsed as YAML).

    Returns:
        The checked config.

    Raises:
        ConfigError: unknown, missing or mistyped keys, or a held-out caption outside the world's grammar.
    """
    data = load_raw(path)
    for assignment in overrides:
        apply_override(data, assignment)
    origin = str(path)
    config = build_dataclass(TrainConfig, data, origin)
    for index, caption in enumerate(config.data.heldout_captions):
        try:
            generator.parse_caption(caption)
        except ValueError as error:
            raise ConfigError(f"{origin}: data.heldout_captions.{index}: {error}") from error
    return config
