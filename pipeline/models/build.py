"""Build Stable-Diffusion-architecture models from scratch and save them as diffusers folders.

Used by the tests (tiny random weights) and by the shapes-world training jobs. The folders these
functions write are loaded by `pipeline.models.loading.load_diffusion_model`, exactly like SD 1.5.

The tokenizer is CLIP's own BPE (the vocabulary file that open_clip ships), converted to the
`vocab.json` + `merges.txt` pair that `transformers.CLIPTokenizer` reads: prompts tokenize exactly
as they do for Stable Diffusion, offline.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import open_clip
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from pipeline.models.loading import SD_DDIM_DEFAULTS


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible byte -> printable unicode map."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(code) for code in codes), strict=True))


def write_clip_tokenizer(folder: str | os.PathLike, model_max_length: int = 77) -> CLIPTokenizer:
    """Write CLIP's BPE tokenizer (49,408 tokens) to `folder` and load it back.

    Args:
        folder: destination; gets vocab.json, merges.txt and the tokenizer configs.
        model_max_length: padded prompt length L (SD uses 77).
    """
    bpe_path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(bpe_path, "rt", encoding="utf-8") as bpe_file:
        merges = bpe_file.read().split("\n")
    # Same slice as CLIP's SimpleTokenizer: the header line, then 48,894 merges.
    merges = [tuple(line.split()) for line in merges[1 : 49152 - 256 - 2 + 1]]
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [char + "</w>" for char in byte_chars]
    vocab += ["".join(pair) for pair in merges] + ["<|startoftext|>", "<|endoftext|>"]
    tokenizer = CLIPTokenizer(
        vocab={token: index for index, token in enumerate(vocab)},
        merges=merges,
        model_max_length=model_max_length,
        pad_token="<|endoftext|>",
    )
    tokenizer.save_pretrained(folder)
    return CLIPTokenizer.from_pretrained(folder)


@dataclass(frozen=True)
class SDArchitecture:
    """Sizes of a Stable-Diffusion-architecture model (SD 1.5 is ~100x wider at every level).

    Attributes:
        image_size: RGB side in pixels; latents are image_size / 2**(len(vae_channels)-1).
        latent_channels: channels of z (SD: 4).
        unet_channels: block_out_channels of the UNet.
        unet_layers_per_block: resnet (+ transformer) layers per UNet level.
        unet_plain_levels: how many of the UNet's top (highest-resolution) levels have no attention, as
            SDXL's first level: self-attention there costs the square of the latent's area. 0 (SD 1.5)
            gives every level but the lowest cross-attention; the mid block always has it.
        unet_attention_head_dim: heads' width in the UNet's transformer blocks.
        vae_channels: block_out_channels of the VAE.
        vae_layers_per_block: resnet layers per VAE level.
        text_width: hidden size of the CLIP text encoder (= UNet cross_attention_dim).
        text_layers: transformer layers in the text encoder.
        text_heads: attention heads in the text encoder.
        max_length: tokenizer's padded prompt length L.
        norm_groups: GroupNorm groups in UNet and VAE.
        scheduler: DDIM scheduler config written to the folder.
    """

    image_size: int = 32
    latent_channels: int = 4
    unet_channels: tuple[int, ...] = (32, 64)
    unet_layers_per_block: int = 1
    unet_plain_levels: int = 0
    unet_attention_head_dim: int = 8
    vae_channels: tuple[int, ...] = (32, 64)
    vae_layers_per_block: int = 1
    text_width: int = 32
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate: int = 64
    max_length: int = 77
    norm_groups: int = 8
    scheduler: dict = field(default_factory=lambda: dict(SD_DDIM_DEFAULTS))

    def __post_init__(self) -> None:
        levels = len(self.unet_channels)
        if not 0 <= self.unet_plain_levels < levels:
            raise ValueError(
                f"unet_plain_levels must be between 0 and {levels - 1} (the UNet's {levels} levels less the "
                f"lowest, which never attends), got {self.unet_plain_levels}"
            )

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.vae_channels) - 1)


# Stable Diffusion 1.5's sizes (its unet/, vae/ and text_encoder/ configs): 859,520,964 UNet,
# 83,653,863 VAE and 123,060,480 text-encoder parameters, 512x512 pixels, 64x64x4 latents.
SD15_ARCHITECTURE = SDArchitecture(
    image_size=512,
    unet_channels=(320, 640, 1280, 1280),
    unet_layers_per_block=2,
    unet_attention_head_dim=8,
    vae_channels=(128, 256, 512, 512),
    vae_layers_per_block=2,
    text_width=768,
    text_layers=12,
    text_heads=12,
    text_intermediate=3072,
    norm_groups=32,
)


def unet_block_types(arch: SDArchitecture) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The UNet's down and up block types, top level first: plain, cross-attention, plain lowest."""
    plain, attending = arch.unet_plain_levels, len(arch.unet_channels) - 1 - arch.unet_plain_levels
    down = ("DownBlock2D",) * plain + ("CrossAttnDownBlock2D",) * attending + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * attending + ("UpBlock2D",) * plain
    return down, up


def build_unet(arch: SDArchitecture) -> UNet2DConditionModel:
    down_block_types, up_block_types = unet_block_types(arch)
    return UNet2DConditionModel(
        sample_size=arch.latent_size,
        in_channels=arch.latent_channels,
        out_channels=arch.latent_channels,
        block_out_channels=arch.unet_channels,
        layers_per_block=arch.unet_layers_per_block,
        down_block_types=down_block_types,
        up_block_types=up_block_types,
        cross_attention_dim=arch.text_width,
        attention_head_dim=arch.unet_attention_head_dim,
        norm_num_groups=arch.norm_groups,
    )


def build_vae(arch: SDArchitecture) -> AutoencoderKL:
    levels = len(arch.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=arch.latent_channels,
        block_out_channels=arch.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        layers_per_block=arch.vae_layers_per_block,
        norm_num_groups=arch.norm_groups,
        sample_size=arch.image_size,
    )


def build_text_encoder(arch: SDArchitecture, vocab_size: int) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=arch.text_width,
        intermediate_size=arch.text_intermediate,
        num_hidden_layers=arch.text_layers,
        num_attention_heads=arch.text_heads,
        max_position_embeddings=arch.max_length,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return CLIPTextModel(config)


def save_sd_folder(
    folder: str | os.PathLike,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    scheduler_config: dict | None = None,
) -> Path:
    """Write the five components in diffusers' folder layout (safetensors weights)."""
    folder = Path(folder)
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    tokenizer.save_pretrained(folder / "tokenizer")
    DDIMScheduler(**(scheduler_config or SD_DDIM_DEFAULTS)).save_pretrained(folder / "scheduler")
    model_index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"],
    }
    (folder / "model_index.json").write_text(json.dumps(model_index, indent=2))
    return folder


def calibrate_latent_scale(vae: AutoencoderKL, images: torch.Tensor) -> float:
    """Set `vae.config.scaling_factor` so latents of `images` have unit standard deviation.

    SD's 0.18215 was found the same way on its data. Args: images (B, 3, H, W) in [-1, 1].
    """
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mean
    scale = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scale)
    return scale


def build_random_sd(
    folder: str | os.PathLike,
    arch: SDArchitecture | None = None,
    seed: int = 0,
    unet_output_scale: float = 1.0,
) -> Path:
    """A random-weight SD-architecture model saved as a diffusers folder.

    Args:
        folder: destination folder.
        arch: sizes; the default is a ~1 M-parameter model at 32x32 pixels, 8x8x4 latents.
        seed: torch seed for the random initialisation.
        unet_output_scale: multiplies the UNet's output convolution. A random UNet's noise
            prediction swings with its input far more than a trained one's, which breaks DDIM's
            small-step invertibility; a small scale gives a smooth, trained-like eps.
    """
    arch = arch or SDArchitecture()
    torch.manual_seed(seed)
    tokenizer = write_clip_tokenizer(Path(folder) / "tokenizer", arch.max_length)
    unet, vae = build_unet(arch), build_vae(arch)
    with torch.no_grad():
        unet.conv_out.weight.mul_(unet_output_scale)
        unet.conv_out.bias.mul_(unet_output_scale)
    calibrate_latent_scale(vae, torch.rand(8, 3, arch.image_size, arch.image_size) * 2 - 1)
    return save_sd_folder(
        folder,
        unet=unet,
        vae=vae,
        text_encoder=build_text_encoder(arch, vocab_size=len(tokenizer)),
        tokenizer=tokenizer,
        scheduler_config=arch.scheduler,
    )
