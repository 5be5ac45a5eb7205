"""Load any Stable-Diffusion-family model from a diffusers-format folder or a hub id.

The same code loads `runwayml/stable-diffusion-v1-5`, a local copy of it, the shapes-world model that
ships with inversa, and the tiny random-weight models the tests build: nothing here knows which.

Layout expected (diffusers' `save_pretrained` layout)::

    MODEL/
      unet/          UNet2DConditionModel
      vae/           AutoencoderKL
      text_encoder/  CLIPTextModel (any transformers model whose output[0] is the token embeddings)
      tokenizer/     loadable with transformers.AutoTokenizer
      scheduler/     scheduler_config.json (beta schedule; rebuilt as DDIMScheduler)
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import AutoTokenizer, CLIPTextModel, PreTrainedTokenizerBase

from pipeline.diffusion.precision import PRECISIONS

SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")

# Stable Diffusion's DDIM defaults; a model folder's scheduler config may only override the beta table.
SD_DDIM_DEFAULTS = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "num_train_timesteps": 1000,
}


class ModelLoadError(ValueError):
    """A model folder or hub id that inversa cannot load or cannot invert correctly."""


@dataclass
class DiffusionModel:
    """The parts of a text-conditioned latent diffusion model that inversion and editing use.

    Attributes:
        unet: noise predictor eps_theta(z_t, t, c).
        vae: image <-> latent autoencoder.
        text_encoder: prompt -> token embeddings c, shape (B, L, D).
        tokenizer: prompt -> token ids, padded to `tokenizer.model_max_length` (L).
        scheduler: DDIM scheduler holding the alpha-bar table.
        model_id: the path or hub id it was loaded from.
        fingerprint: sha256 over the weights' bytes, recorded in job outputs.
        precision: fp32 | tf32 | mixed | bf16, the numeric policy of its UNet calls
            (`pipeline.diffusion.precision`); the engine makes it current while it inverts or edits.
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    scheduler: DDIMScheduler
    model_id: str
    fingerprint: str
    precision: str = "fp32"

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_size(self) -> int:
        return int(self.unet.config.sample_size)

    @property
    def image_size(self) -> int:
        """Side of the square RGB images the model expects, in pixels."""
        return self.latent_size * self.vae_scale_factor

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)


def _resolve(source: str | os.PathLike) -> tuple[str, bool]:
    path = Path(source).expanduser()
    if path.exists():
        missing = [name for name in SUBFOLDERS if not (path / name).is_dir()]
        if missing:
            raise ModelLoadError(
                f"model.path {str(path)!r} is not a diffusers-format folder: missing {missing}. "
                "Save a pipeline with `StableDiffusionPipeline.save_pretrained(PATH)` or point "
                "model.path at a hub id such as 'runwayml/stable-diffusion-v1-5'."
            )
        return str(path), True
    if str(source).startswith((".", "/", "~")):
        raise ModelLoadError(f"model.path {str(source)!r} does not exist. Fix the path or use a hub id.")
    return str(source), False


def build_ddim_scheduler(scheduler_config: dict) -> DDIMScheduler:
    """A DDIM scheduler with SD's defaults and the beta table of `scheduler_config`.

    Raises:
        ModelLoadError: if the model does not predict noise (epsilon): DDIM inversion as implemented
            here inverts eps-prediction models only, and a v-prediction model would be mis-edited.
    """
    prediction_type = scheduler_config.get("prediction_type", "epsilon")
    if prediction_type != "epsilon":
        raise ModelLoadError(
            f"scheduler prediction_type={prediction_type!r}: inversa inverts epsilon-prediction models "
            "only (SD 1.x, SD 2.x-base). Use an epsilon-prediction checkpoint."
        )
    config = dict(SD_DDIM_DEFAULTS)
    for key in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "trained_betas"):
        if scheduler_config.get(key) is not None:
            config[key] = scheduler_config[key]
    return DDIMScheduler(**config)


def fingerprint_modules(*modules: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (names and bytes), in a fixed order."""
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_diffusion_model(
    source: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    precision: str = "fp32",
) -> DiffusionModel:
    """Load UNet, VAE, text encoder, tokenizer and a DDIM scheduler.

    Args:
        source: a diffusers-format folder or a hub id (read from the local hub cache when offline).
        device: where the modules go.
        dtype: parameter dtype. Inversion optimises in float32; keep the default unless only sampling.
        precision: fp32 | tf32 | mixed | bf16 (`pipeline.diffusion.precision`): how float32 weights compute.

    Returns:
        The loaded model in eval mode with gradients disabled on all weights.
    """
    if precision not in PRECISIONS:
        raise ModelLoadError(f"model.precision {precision!r} is not one of {', '.join(PRECISIONS)}.")
    location, is_local = _resolve(source)
    kwargs = {"local_files_only": is_local or os.environ.get("HF_HUB_OFFLINE") == "1"}
    try:
        scheduler_config = DDIMScheduler.load_config(location, subfolder="scheduler", **kwargs)
        scheduler = build_ddim_scheduler(scheduler_config)
        unet = UNet2DConditionModel.from_pretrained(location, subfolder="unet", torch_dtype=dtype, **kwargs)
        vae = AutoencoderKL.from_pretrained(location, subfolder="vae", torch_dtype=dtype, **kwargs)
        text_encoder = CLIPTextModel.from_pretrained(
            location, subfolder="text_encoder", torch_dtype=dtype, **kwargs
        )
        tokenizer = AutoTokenizer.from_pretrained(location, subfolder="tokenizer", **kwargs)
    except ModelLoadError:
        raise
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"could not load model {location!r}: {error}. For a hub id, download it first "
            "(`huggingface-cli download ID`) on a machine with internet, or pass a local folder."
        ) from error
    if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
        raise ModelLoadError(
            f"model {location!r}: unet.cross_attention_dim={unet.config.cross_attention_dim} does not match "
            f"text_encoder.hidden_size={text_encoder.config.hidden_size}."
        )
    for module in (unet, vae, text_encoder):
        module.to(device).eval().requires_grad_(False)
    return DiffusionModel(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        model_id=str(source),
        fingerprint=fingerprint_modules(unet, vae, text_encoder),
        precision=precision,
    )


def read_model_index(source: str | os.PathLike) -> dict:
    """The folder's model_index.json, or {} when absent (informational only)."""
    index = Path(source) / "model_index.json"
    return json.loads(index.read_text()) if index.exists() else {}
