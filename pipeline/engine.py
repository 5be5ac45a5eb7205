"""The inversion and editing engine's public interface: invert a batch once, edit it many times.

Pure tensor code: no Ray, no files. Typical use::

    model = load_diffusion_model("runwayml/stable-diffusion-v1-5", device="cuda")
    inversion = invert(model, images, ["a cat on a sofa", ...], InversionConfig(method="null_text"))
    results = edit(model, inversion, [EditRequest(0, "a dog on a sofa", AttentionControl("replace")), ...])

`images` are uint8 tensors (B, H, W, 3) at the model's resolution (`model.image_size`). One inversion
serves any number of edit requests; requests of all images run batched. Methods come from the
registry in `pipeline.methods`; the Prompt-to-Prompt batch lives in `pipeline.diffusion.editing`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pipeline.diffusion import precision
from pipeline.diffusion.control import AttentionControl
from pipeline.diffusion.ddim import DDIMSchedule
from pipeline.diffusion.editing import EditLayout, EditRequest, EditResult, run_edits, validate_request
from pipeline.diffusion.errors import EngineInputError, NonFiniteError
from pipeline.diffusion.sampling import sample
from pipeline.diffusion.tokens import encode_prompts, prompt_token_ids
from pipeline.diffusion.trajectory import InversionInputs, MethodResult
from pipeline.methods import InversionConfig, UnknownMethodError, get_method, load_invert
from pipeline.models.loading import DiffusionModel
from pipeline.models.vae import decode_latents, encode_images

__all__ = [
    "AttentionControl",
    "EditRequest",
    "EditResult",
    "EngineInputError",
    "InversionConfig",
    "InversionResult",
    "NonFiniteError",
    "edit",
    "invert",
]


@dataclass
class InversionResult:
    """One inverted batch, reusable for any number of edits.

    Attributes:
        config: the inversion settings.
        schedule: the DDIM grid (timesteps in sampling order).
        source_prompts: per image, the prompt it was inverted with.
        latents: MethodResult with the trajectory (S+1, B, C, h, w) and per-step embeddings (S, B, L, D).
        reconstructions: (B, H, W, 3) uint8, the images decoded from the reconstruction latents.
        errors: per image, None or the error that makes the image unusable (names image and step).
        seconds: wall time of the whole batch inversion, reconstruction included.
    """

    config: InversionConfig
    schedule: DDIMSchedule
    source_prompts: list[str]
    latents: MethodResult
    reconstructions: torch.Tensor
    errors: list[str | None]
    seconds: float

    @property
    def batch_size(self) -> int:
        return len(self.source_prompts)


def _check_images(model: DiffusionModel, images: torch.Tensor) -> None:
    size = model.image_size
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        raise EngineInputError(
            f"images must be a torch.uint8 tensor (B, {size}, {size}, 3); got "
            f"{type(images).__name__} {getattr(images, 'dtype', '')}. Decode to RGB uint8 first."
        )
    if images.ndim != 4 or tuple(images.shape[1:]) != (size, size, 3):
        raise EngineInputError(
            f"images must have shape (B, {size}, {size}, 3) (RGB at the model's resolution); got "
            f"{tuple(images.shape)}. Convert to RGB and resize/crop to {size}x{size} before inverting."
        )


def _check_prompts(model: DiffusionModel, prompts: list[str], count: int, argument: str) -> None:
    if len(prompts) != count:
        raise EngineInputError(
            f"{argument} needs one prompt per image: got {len(prompts)} for {count} images."
        )
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise EngineInputError(
                f"{argument}[{index}] is empty; this method needs a prompt describing the image."
            )
        prompt_token_ids(model.tokenizer, prompt, f"{argument}[{index}]")


def _check_config(model: DiffusionModel, config: InversionConfig, image_encoder=None, embedding_vae=None):
    """The method's registry entry and parameters, or EngineInputError naming the fix."""
    try:
        info = get_method(config.method)
    except UnknownMethodError as error:
        raise EngineInputError(str(error)) from None
    params = config.method_params
    if not isinstance(params, info.params):
        raise EngineInputError(
            f"inversion.params for method {config.method!r} must be a {info.params.__name__}; "
            f"got {type(params).__name__}."
        )
    if info.optimizes and model.dtype != torch.float32:
        raise EngineInputError(
            f"inversion.method {config.method!r} optimises embeddings and needs a float32 model; "
            f"the model is {model.dtype}. Load it with dtype=torch.float32."
        )
    if config.encoder_fit_steps and model.vae.dtype != torch.float32:
        raise EngineInputError(
            f"inversion.encoder_fit_steps {config.encoder_fit_steps} optimises latents through the VAE's "
            f"decoder and needs a float32 VAE; the VAE is {model.vae.dtype}. Load the model with "
            "dtype=torch.float32 or set encoder_fit_steps to 0."
        )
    if info.needs_image_encoder and image_encoder is None:
        raise EngineInputError(
            f"inversion.method {config.method!r} maps the image itself through a CLIP vision tower; "
            "pass image_encoder (e.g. ClipScorer(...).image_tokens) to invert()."
        )
    named_vae = getattr(params, "vae", None)
    if (named_vae is None) != (embedding_vae is None):
        raise EngineInputError(
            f"inversion.params.vae is {named_vae!r} but invert() was given "
            f"{'no' if embedding_vae is None else 'an'} embedding_vae; pass the VAE the spec names "
            "(pipeline.editors.load_null_text_vae) exactly when it names one."
        )
    return params


def invert(
    model: DiffusionModel,
    images: torch.Tensor,
    source_prompts: list[str],
    config: InversionConfig,
    image_encoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
    embedding_vae: torch.nn.Module | None = None,
) -> InversionResult:
    """Invert a batch of images once, with their reconstruction.

    Args:
        model: a loaded SD-family model.
        images: (B, H, W, 3) uint8 RGB at `model.image_size`.
        source_prompts: B prompts. For prompt_tuning these initialise the tuned embedding c_T,
            which the paper takes from the *target* prompt c*.
        config: the method and its parameters.
        image_encoder: f(images (B, 3, H, W) in [0, 1]) -> (B, N, D') image tokens, for methods that
            encode the image itself (style_diffusion: the frozen CLIP vision tower).
        embedding_vae: the dataset-wide VAE that `inversion.params.vae` names (null_text_vae), loaded
            by `pipeline.editors.load_null_text_vae`; exactly when the config names one.

    Returns:
        InversionResult; images that failed (non-finite values) carry an error, the others are usable.
    """
    started = time.perf_counter()
    params = _check_config(model, config, image_encoder, embedding_vae)
    _check_images(model, images)
    _check_prompts(model, source_prompts, images.shape[0], "source_prompts")
    schedule = DDIMSchedule.from_scheduler(model.scheduler, config.num_steps, config.resolved_strength)
    inputs = InversionInputs(
        unet=model.unet,
        schedule=schedule,
        clean_latents=encode_images(model, images, config.encoder_fit_steps),
        cond_embeddings=encode_prompts(model.tokenizer, model.text_encoder, source_prompts, "source_prompts"),
        uncond_embeddings=encode_prompts(model.tokenizer, model.text_encoder, [""] * len(source_prompts)),
        guidance_scale=config.guidance_scale,
        images=images.to(model.device).permute(0, 3, 1, 2).float() / 255.0,
        image_encoder=image_encoder,
        embedding_vae=embedding_vae,
    )
    with precision.using(model.precision):
        result = load_invert(config.method)(inputs, params)
        if result.reconstruction is None:
            result.reconstruction, _ = sample(
                model.unet,
                schedule,
                result.trajectory[-1],
                result.cond_embeddings,
                result.uncond_embeddings,
                config.guidance_scale,
                value_embeddings=result.value_embeddings,
            )
    return InversionResult(
        config=config,
        schedule=schedule,
        source_prompts=list(source_prompts),
        latents=result,
        reconstructions=decode_latents(model, result.reconstruction),
        errors=list(result.errors),
        seconds=time.perf_counter() - started,
    )


def edit(model: DiffusionModel, inversion: InversionResult, requests: list[EditRequest]) -> list[EditResult]:
    """Run edit requests of any inverted images, all in one batched sampling pass.

    Args:
        model: the model the batch was inverted with.
        inversion: the result of `invert`.
        requests: edits; several may share an image.

    Returns:
        One EditResult per request, in order. Requests on images whose inversion failed, and edits
        whose latents became non-finite, come back with `error` set and no image.
    """
    started = time.perf_counter()
    for position, request in enumerate(requests):
        validate_request(model.tokenizer, inversion.batch_size, inversion.source_prompts, position, request)
        if request.embedding_vae is not None and request.sample_temperature is None:
            raise EngineInputError(
                f"requests[{position}] names an embedding_vae but no sample_temperature; give the "
                "sample's temperature (1 = the VAE's own sigma, 0 = its mean)."
            )
        if (
            request.sample_temperature is not None
            and request.embedding_vae is None
            and not inversion.latents.edit_hook.stochastic
        ):
            raise EngineInputError(
                f"requests[{position}] asks for a stochastic sample (sample_temperature), but inversion "
                f"method {inversion.config.method!r} has none; invert with method 'null_text_vae' or give the "
                "request a conditional-embedding VAE (embedding_vae)."
            )
    results: dict[int, EditResult] = {}
    for position, request in enumerate(requests):
        error = inversion.errors[request.image_index]
        if error is not None:
            results[position] = EditResult(request, None, None, f"inversion failed: {error}", 0.0)
    layout = EditLayout.build(requests, [error is None for error in inversion.errors])
    if layout.row_images:
        with precision.using(model.precision):
            edited = run_edits(
                model,
                inversion.schedule,
                inversion.latents,
                inversion.source_prompts,
                inversion.config.guidance_scale,
                requests,
                layout,
            )
        results.update(edited)
    share = (time.perf_counter() - started) / max(1, len(requests))
    ordered = [results[position] for position in range(len(requests))]
    for result in ordered:
        result.seconds = share
    return ordered
