"""The inversion and editing engine's public interface: invert a batch once, edit it many times.

Pure tensor code: no Ray, no files. Typical use::

    model = load_diffusion_model("runwayml/stable-diffusion-v1-5", device="cuda")
    inversion = invert(model, images, ["a cat on a sofa", ...], InversionConfig(method="null_text"))
    results = edit(model, inversion, [EditRequest(0, "a dog on a sofa", AttentionControl("replace")), ...])

`images` are uint8 tensors (B, H, W, 3) at the model's resolution (`model.image_size`). One inversion
serves any number of edit requests; requests of all images run batched.
"""

from __future__ import annotations

import difflib
import time
from dataclasses import dataclass, field
from typing import Literal

import torch

from pipeline.diffusion.attention import (
    AttentionController,
    EditPlan,
    mask_resolution_for,
    use_attention_controller,
)
from pipeline.diffusion.ddim import DDIMSchedule
from pipeline.diffusion.errors import EngineInputError, NonFiniteError
from pipeline.diffusion.masks import upsample_mask, word_mask
from pipeline.diffusion.sampling import sample
from pipeline.diffusion.tokens import (
    encode_prompts,
    equalizer,
    prompt_token_ids,
    refinement_mapper,
    replacement_mapper,
    split_words,
    word_positions,
)
from pipeline.methods.ddim_inversion import invert_ddim
from pipeline.methods.negative_prompt import invert_negative_prompt
from pipeline.methods.null_text import invert_null_text
from pipeline.methods.prompt_tuning import invert_prompt_tuning
from pipeline.methods.result import MethodResult
from pipeline.models.loading import DiffusionModel

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

# Prompt-to-Prompt's local blend starts after this fraction of the steps (start_blend = 0.2).
LOCAL_BLEND_START = 0.2

InversionMethod = Literal["ddim", "null_text", "negative_prompt", "prompt_tuning"]
INVERSION_METHODS: tuple[str, ...] = ("ddim", "null_text", "negative_prompt", "prompt_tuning")
ControlMode = Literal["none", "replace", "refine"]


@dataclass(frozen=True)
class InversionConfig:
    """How images are inverted.

    Attributes:
        method: ddim | null_text | negative_prompt | prompt_tuning.
        num_steps: DDIM steps over the full schedule (T in the papers' step units).
        guidance_scale: classifier-free guidance w used to reconstruct and edit.
        inversion_guidance: w while DDIM-inverting (1 = source prompt only; prompt_tuning uses 0).
        strength: fraction of the schedule inverted; < 1 stops at the return step t0 (DiffusionCLIP).
        inner_steps: optimisation iterations per timestep (null-text N=10, prompt tuning N=1..5).
        learning_rate: null-text base lr (decays as lr * (1 - i/100)); prompt tuning's beta.
        early_stop_epsilon: null-text stops a timestep once loss < epsilon + i * 2e-5.
        prompt_tuning_optimizer: "adam" (same optimiser as null-text) or "sgd" (Algorithm 1 literally).
    """

    method: InversionMethod = "null_text"
    num_steps: int = 50
    guidance_scale: float = 7.5
    inversion_guidance: float = 1.0
    strength: float = 1.0
    inner_steps: int = 10
    learning_rate: float = 1e-2
    early_stop_epsilon: float = 1e-5
    prompt_tuning_optimizer: Literal["adam", "sgd"] = "adam"


@dataclass(frozen=True)
class AttentionControl:
    """Prompt-to-Prompt / P2Plus attention control for one edit.

    Attributes:
        mode: none | replace (word swap, same word count) | refine (words added or removed).
        cross_replace_steps: fraction of steps whose cross-attention maps come from the source.
        self_replace_steps: fraction of steps whose self-attention maps come from the source.
        reweight: (word, scale) pairs scaling the target prompt's cross-attention to that word.
        blend_words: words whose cross-attention defines the local-blend mask; empty = no blend.
        blend_threshold: local-blend mask threshold on the max-normalised attention map.
        unconditional_self_replace_steps: P2Plus tau_u, fraction of steps in which self-attention
            of the unconditional branch is also injected; 0 = plain P2P.
    """

    mode: ControlMode = "replace"
    cross_replace_steps: float = 0.8
    self_replace_steps: float = 0.4
    reweight: tuple[tuple[str, float], ...] = ()
    blend_words: tuple[str, ...] = ()
    blend_threshold: float = 0.3
    unconditional_self_replace_steps: float = 0.0


@dataclass(frozen=True)
class EditRequest:
    """One edit of one inverted image.

    Attributes:
        image_index: row of the inverted batch this edit starts from.
        target_prompt: the edit prompt.
        control: attention control.
        eta: prompt tuning's interpolation weight (eq. 9/10); ignored by other methods.
        latent_interpolation: prompt tuning's eq. 10 variant instead of eq. 9.
        seed: recorded for reproducibility; deterministic methods do not draw noise.
    """

    image_index: int
    target_prompt: str
    control: AttentionControl = field(default_factory=AttentionControl)
    eta: float = 0.9
    latent_interpolation: bool = False
    seed: int = 0


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


@dataclass
class EditResult:
    """One edit's output.

    Attributes:
        request: the request it answers.
        image: (H, W, 3) uint8, or None when the edit failed.
        mask: (H, W) bool region the edit was meant to change (from cross-attention of the changed or
            blended words), or None when the prompts name no changed word.
        error: None, or why the edit failed.
        seconds: this edit's share of the batch's wall time.
        latents: (C, h, w) the edited z_0 before decoding.
    """

    request: EditRequest
    image: torch.Tensor | None
    mask: torch.Tensor | None
    error: str | None
    seconds: float
    latents: torch.Tensor | None = None


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


def encode_images(model: DiffusionModel, images: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> z_0 = ENC(x) * scaling_factor, (B, C, h, w); the posterior mean."""
    pixels = images.permute(0, 3, 1, 2).to(model.device, model.vae.dtype) / 127.5 - 1.0
    with torch.no_grad():
        latents = model.vae.encode(pixels).latent_dist.mean
    shift = getattr(model.vae.config, "shift_factor", None) or 0.0
    return ((latents - shift) * model.vae.config.scaling_factor).float()


def decode_latents(model: DiffusionModel, latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) latents -> (B, H, W, 3) uint8 images on the CPU."""
    shift = getattr(model.vae.config, "shift_factor", None) or 0.0
    with torch.no_grad():
        pixels = model.vae.decode(
            latents.to(model.vae.dtype) / model.vae.config.scaling_factor + shift
        ).sample
    pixels = ((pixels.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu()


def _run_method(
    model: DiffusionModel,
    config: InversionConfig,
    schedule: DDIMSchedule,
    clean_latents: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
) -> MethodResult:
    unet = model.unet
    if config.method == "ddim":
        return invert_ddim(unet, schedule, clean_latents, cond, uncond, config.inversion_guidance)
    if config.method == "negative_prompt":
        return invert_negative_prompt(unet, schedule, clean_latents, cond)
    if config.method == "null_text":
        return invert_null_text(
            unet,
            schedule,
            clean_latents,
            cond,
            uncond,
            guidance_scale=config.guidance_scale,
            inversion_guidance=config.inversion_guidance,
            inner_steps=config.inner_steps,
            learning_rate=config.learning_rate,
            early_stop_epsilon=config.early_stop_epsilon,
        )
    if config.method == "prompt_tuning":
        return invert_prompt_tuning(
            unet,
            schedule,
            clean_latents,
            cond,
            uncond,
            guidance_scale=config.guidance_scale,
            inner_steps=config.inner_steps,
            learning_rate=config.learning_rate,
            optimizer=config.prompt_tuning_optimizer,
        )
    raise EngineInputError(
        f"inversion.method {config.method!r} is unknown; choose one of {INVERSION_METHODS}."
    )


def invert(
    model: DiffusionModel, images: torch.Tensor, source_prompts: list[str], config: InversionConfig
) -> InversionResult:
    """Invert a batch of images once, with their reconstruction.

    Args:
        model: a loaded SD-family model.
        images: (B, H, W, 3) uint8 RGB at `model.image_size`.
        source_prompts: B prompts. For prompt_tuning these initialise the tuned embedding c_T,
            which the paper takes from the *target* prompt c*.
        config: the method and its parameters.

    Returns:
        InversionResult; images that failed (non-finite values) carry an error, the others are usable.
    """
    started = time.perf_counter()
    if config.method not in INVERSION_METHODS:
        raise EngineInputError(
            f"inversion.method {config.method!r} is unknown; choose one of {INVERSION_METHODS}."
        )
    _check_images(model, images)
    _check_prompts(model, source_prompts, images.shape[0], "source_prompts")
    if config.method in ("null_text", "prompt_tuning") and model.dtype != torch.float32:
        raise EngineInputError(
            f"inversion.method {config.method!r} optimises embeddings and needs a float32 model; "
            f"the model is {model.dtype}. Load it with dtype=torch.float32."
        )
    schedule = DDIMSchedule.from_scheduler(model.scheduler, config.num_steps, config.strength)
    clean_latents = encode_images(model, images)
    cond = encode_prompts(model.tokenizer, model.text_encoder, source_prompts, "source_prompts")
    uncond = encode_prompts(model.tokenizer, model.text_encoder, [""] * len(source_prompts))
    result = _run_method(model, config, schedule, clean_latents, cond, uncond)
    if result.reconstruction is None:
        result.reconstruction, _ = sample(
            model.unet,
            schedule,
            result.trajectory[-1],
            result.cond_embeddings,
            result.uncond_embeddings,
            config.guidance_scale,
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


@dataclass
class _EditBatch:
    """Row layout of one edit call: per image a source row followed by its edit rows."""

    row_images: list[int] = field(default_factory=list)
    edit_rows: list[int] = field(default_factory=list)
    edit_sources: list[int] = field(default_factory=list)
    edit_requests: list[int] = field(default_factory=list)  # position in the caller's list


def _validate_request(
    model: DiffusionModel, inversion: InversionResult, position: int, request: EditRequest
) -> None:
    where = f"requests[{position}]"
    if not 0 <= request.image_index < inversion.batch_size:
        raise EngineInputError(
            f"{where}.image_index={request.image_index} is outside the inverted batch of {inversion.batch_size} images."
        )
    if not request.target_prompt or not request.target_prompt.strip():
        raise EngineInputError(
            f"{where}.target_prompt is empty; give the prompt the image should be edited towards."
        )
    prompt_token_ids(model.tokenizer, request.target_prompt, f"{where}.target_prompt")
    if not 0.0 <= request.eta <= 1.0:
        raise EngineInputError(
            f"{where}.eta={request.eta} must be in [0, 1] (eq. 9 of prompt tuning inversion)."
        )
    control = request.control
    if control.mode not in ("none", "replace", "refine"):
        raise EngineInputError(f"{where}.control.mode={control.mode!r}; choose none, replace or refine.")
    source = inversion.source_prompts[request.image_index]
    for word in control.blend_words:
        if not word_positions(model.tokenizer, source, word) and not word_positions(
            model.tokenizer, request.target_prompt, word
        ):
            raise EngineInputError(
                f"{where}.control.blend_words: {word!r} is in neither the source prompt {source!r} nor the "
                f"target prompt {request.target_prompt!r}."
            )


def _control_tensors(
    model: DiffusionModel, source: str, request: EditRequest, steps: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int, int]]:
    """cross matrix (L, L), cross alpha (L,), equalizer (L,), (cross, self, uncond-self) step limits."""
    tokenizer, control = model.tokenizer, request.control
    length = tokenizer.model_max_length
    if control.mode == "replace":
        matrix, alpha = replacement_mapper(tokenizer, source, request.target_prompt), torch.ones(length)
    elif control.mode == "refine":
        index, alpha = refinement_mapper(tokenizer, source, request.target_prompt)
        matrix = torch.zeros(length, length)
        matrix[index, torch.arange(length)] = 1.0
    else:
        matrix, alpha = torch.eye(length), torch.zeros(length)
    scales = equalizer(tokenizer, request.target_prompt, control.reweight)
    if control.mode == "none":
        limits = (steps if control.reweight else 0, 0, 0)
    else:
        limits = (
            int(control.cross_replace_steps * steps),
            int(control.self_replace_steps * steps),
            int(control.unconditional_self_replace_steps * steps),
        )
    return matrix, alpha, scales, limits


def _changed_words(source: str, target: str) -> tuple[list[str], list[str]]:
    """Words of the source and of the target that an edit changes (difflib alignment of words)."""
    source_words, target_words = split_words(source), split_words(target)
    matcher = difflib.SequenceMatcher(
        a=[w.lower() for w in source_words], b=[w.lower() for w in target_words]
    )
    removed, added = [], []
    for tag, a_start, a_end, b_start, b_end in matcher.get_opcodes():
        if tag != "equal":
            removed.extend(range(a_start, a_end))
            added.extend(range(b_start, b_end))
    return removed, added


def _mask_positions(model: DiffusionModel, source: str, request: EditRequest) -> tuple[list[int], list[int]]:
    """Token positions, in the source and in the target prompt, that define the edit's mask."""
    tokenizer = model.tokenizer
    words = request.control.blend_words
    if words:
        source_positions = [p for w in words for p in word_positions(tokenizer, source, w)]
        target_positions = [p for w in words for p in word_positions(tokenizer, request.target_prompt, w)]
        return source_positions, target_positions
    removed, added = _changed_words(source, request.target_prompt)
    source_positions = [p for index in removed for p in word_positions(tokenizer, source, index)]
    target_positions = [p for index in added for p in word_positions(tokenizer, request.target_prompt, index)]
    return source_positions, target_positions


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
        _validate_request(model, inversion, position, request)
    batch = _EditBatch()
    for image in dict.fromkeys(r.image_index for r in requests if inversion.errors[r.image_index] is None):
        source_row = len(batch.row_images)
        batch.row_images.append(image)
        for position, request in enumerate(requests):
            if request.image_index == image:
                batch.edit_rows.append(len(batch.row_images))
                batch.edit_sources.append(source_row)
                batch.edit_requests.append(position)
                batch.row_images.append(image)
    results: list[EditResult | None] = [None] * len(requests)
    for position, request in enumerate(requests):
        if inversion.errors[request.image_index] is not None:
            results[position] = EditResult(
                request, None, None, f"inversion failed: {inversion.errors[request.image_index]}", 0.0
            )
    if batch.row_images:
        _run_edit_batch(model, inversion, requests, batch, results)
    share = (time.perf_counter() - started) / max(1, len(requests))
    for result in results:
        result.seconds = share
    return results


def _run_edit_batch(
    model: DiffusionModel,
    inversion: InversionResult,
    requests: list[EditRequest],
    batch: _EditBatch,
    results: list[EditResult | None],
) -> None:
    steps, latents = inversion.schedule.num_steps, inversion.latents
    device = model.device
    rows = torch.tensor(batch.row_images, device=device)
    edit_requests = [requests[position] for position in batch.edit_requests]
    targets = encode_prompts(model.tokenizer, model.text_encoder, [r.target_prompt for r in edit_requests])
    cond = latents.cond_embeddings[:, rows].clone()
    for slot, (row, request) in enumerate(zip(batch.edit_rows, edit_requests, strict=True)):
        tuned = latents.cond_embeddings[:, request.image_index]
        if latents.edit_conditioning == "interpolate" and not request.latent_interpolation:
            cond[:, row] = request.eta * targets[slot] + (1.0 - request.eta) * tuned
        else:
            cond[:, row] = targets[slot]
    controls = [
        _control_tensors(model, inversion.source_prompts[r.image_index], r, steps) for r in edit_requests
    ]
    plan = EditPlan(
        num_rows=len(batch.row_images),
        edit_rows=torch.tensor(batch.edit_rows, device=device, dtype=torch.long),
        edit_sources=torch.tensor(batch.edit_sources, device=device, dtype=torch.long),
        cross_matrix=torch.stack([c[0] for c in controls]).to(device),
        cross_alpha=torch.stack([c[1] for c in controls]).to(device),
        equalizer=torch.stack([c[2] for c in controls]).to(device),
        cross_until=torch.tensor([c[3][0] for c in controls], device=device),
        self_until=torch.tensor([c[3][1] for c in controls], device=device),
        uncond_self_until=torch.tensor([c[3][2] for c in controls], device=device),
    )
    resolution = mask_resolution_for(model.unet, model.latent_size)
    controller = AttentionController(plan, model.latent_size, resolution)
    mask_positions = [
        _mask_positions(model, inversion.source_prompts[r.image_index], r) for r in edit_requests
    ]

    def masks_now() -> list[torch.Tensor]:
        maps = controller.cross_maps
        threshold = [r.control.blend_threshold for r in edit_requests]
        return [
            word_mask(maps[source], positions[0], resolution, model.latent_size, threshold[slot])
            | word_mask(maps[row], positions[1], resolution, model.latent_size, threshold[slot])
            for slot, (row, source, positions) in enumerate(
                zip(batch.edit_rows, batch.edit_sources, mask_positions, strict=True)
            )
        ]

    blend_from = int(LOCAL_BLEND_START * steps)

    def after_step(step_index: int, z: torch.Tensor) -> torch.Tensor:
        pivot = latents.trajectory[steps - step_index - 1][rows]
        for row, request in zip(batch.edit_rows, edit_requests, strict=True):
            if latents.edit_conditioning == "interpolate" and request.latent_interpolation:
                z[row] = request.eta * z[row] + (1.0 - request.eta) * pivot[row]
        blended = [slot for slot, r in enumerate(edit_requests) if r.control.blend_words]
        if blended and step_index >= blend_from and controller.cross_maps is not None:
            masks = masks_now()
            for slot in blended:
                row, source = batch.edit_rows[slot], batch.edit_sources[slot]
                z[row] = z[source] + masks[slot].to(z.dtype) * (z[row] - z[source])
        return z

    with use_attention_controller(model.unet, controller):
        final, first_nonfinite = sample(
            model.unet,
            inversion.schedule,
            latents.trajectory[-1][rows],
            cond,
            latents.uncond_embeddings[:, rows],
            inversion.config.guidance_scale,
            controller=controller,
            after_step=after_step,
        )
    edit_row_index = torch.tensor(batch.edit_rows, device=device)
    images = decode_latents(model, torch.nan_to_num(final[edit_row_index]))
    final_masks = masks_now() if controller.cross_maps is not None else [None] * len(edit_requests)
    for slot, (row, position, request) in enumerate(
        zip(batch.edit_rows, batch.edit_requests, edit_requests, strict=True)
    ):
        bad_step = int(first_nonfinite[row])
        if bad_step >= 0:
            timestep = int(inversion.schedule.timesteps[bad_step])
            message = f"image {request.image_index}: non-finite latents at edit step {bad_step} (timestep {timestep})"
            results[position] = EditResult(request, None, None, message, 0.0)
            continue
        has_words = any(mask_positions[slot])
        mask = upsample_mask(final_masks[slot], model.image_size).cpu() if has_words else None
        results[position] = EditResult(request, images[slot], mask, None, 0.0, final[row].cpu())
