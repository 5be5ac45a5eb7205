"""Prompt-to-Prompt editing of inverted images, all edits of all images in one sampling pass.

Legend (Prompt-to-Prompt, Hertz et al.; null-text inversion's editing loop; StyleDiffusion §3.4):

    z*_T                    the inverted noise of each image (trajectory[-1])
    source row              an image's reconstruction branch: its per-step embeddings (the method's
                            optimised null-text / tuned prompt), on which the edit rows' attention is
                            modelled
    edit row                one edit: the method's edit hook gives its conditional embedding (the target
                            prompt c*, or prompt tuning's eq. 9 interpolation) and may steer its latent
                            after each step (eq. 10)
    EditControls            per edit: the token map (replace / refine / none), refine's alpha, the
                            equalizer c, the (S, L) cross window and the self / P2Plus windows
    LocalBlend              after step i >= int(blend_start * S): z_edit <- z_src + mask * (z_edit - z_src)
    edit mask               from the final recorded maps: blend words, or else the words that differ
                            between the prompts

Row layout of one call, per guidance branch: per image a source row followed by its edit rows.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline.diffusion.attention import AttentionController, EditPlan, mask_resolution_for
from pipeline.diffusion.control import CONTROL_MODES, AttentionControl, check_bounds, step_window
from pipeline.diffusion.ddim import DDIMSchedule
from pipeline.diffusion.errors import EngineInputError
from pipeline.diffusion.masks import LocalBlend, MaskWords, edit_mask, upsample_mask
from pipeline.diffusion.sampling import sample
from pipeline.diffusion.tokens import (
    cross_window,
    encode_prompts,
    equalizer,
    prompt_token_ids,
    refinement_mapper,
    replacement_mapper,
    split_words,
    word_positions,
)
from pipeline.diffusion.trajectory import MethodResult
from pipeline.models.loading import DiffusionModel
from pipeline.models.vae import decode_latents


@dataclass(frozen=True)
class EditRequest:
    """One edit of one inverted image.

    Attributes:
        image_index: row of the inverted batch this edit starts from.
        target_prompt: the edit prompt.
        control: attention control.
        eta: prompt tuning's interpolation weight (eq. 9/10); ignored by other methods.
        latent_interpolation: prompt tuning's eq. 10 variant instead of eq. 9.
        seed: the seed of a stochastic edit's sample; recorded (and unused) for deterministic edits.
        sample_temperature: None for a deterministic edit; else the method samples the edit's
            unconditional embeddings with `seed` at this temperature (0 = the mean decode), or, with
            `embedding_vae`, its conditional embeddings.
        embedding_vae: None, or a conditional-embedding VAE (`pipeline.methods.cond_vae`) that samples the
            edit's conditional embeddings C''_t from its C'_t with `seed` at `sample_temperature`.
    """

    image_index: int
    target_prompt: str
    control: AttentionControl = field(default_factory=AttentionControl)
    eta: float = 0.9
    latent_interpolation: bool = False
    seed: int = 0
    sample_temperature: float | None = None
    embedding_vae: Any = None


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


@dataclass(frozen=True)
class EditControls:
    """One edit's attention-control tensors (see the legend of `pipeline.diffusion.attention`).

    Attributes:
        matrix: (L, L) source -> target token map.
        alpha: (L,) weight of the mapped source map per target token.
        scales: (L,) equalizer c.
        window: (S, L) cross-attention injection window.
        self_window: [first, last) steps of conditional self-attention injection.
        uncond_self_window: [first, last) steps of P2Plus unconditional self-attention injection.
    """

    matrix: torch.Tensor
    alpha: torch.Tensor
    scales: torch.Tensor
    window: torch.Tensor
    self_window: tuple[int, int]
    uncond_self_window: tuple[int, int]


def edit_controls(tokenizer, source: str, request: EditRequest, steps: int) -> EditControls:
    """Build one edit's control tensors from its AttentionControl (P2P's controller construction)."""
    control, length = request.control, tokenizer.model_max_length
    target = request.target_prompt
    if control.mode == "replace":
        matrix, alpha = replacement_mapper(tokenizer, source, target), torch.ones(length)
    elif control.mode == "refine":
        index, alpha = refinement_mapper(tokenizer, source, target)
        matrix = torch.zeros(length, length)
        matrix[index, torch.arange(length)] = 1.0
    else:
        matrix, alpha = torch.eye(length), torch.ones(length)
    scales = equalizer(tokenizer, target, control.reweight)
    if control.injects_cross_attention:
        window = cross_window(
            tokenizer, target, control.cross_replace_steps, control.cross_replace_words, steps
        )
        self_window = step_window(control.self_replace_steps, steps)
    else:
        window, self_window = torch.zeros(steps, length), (0, 0)
    uncond_self_window = step_window(control.unconditional_self_replace_steps, steps)
    return EditControls(matrix, alpha, scales, window, self_window, uncond_self_window)


def changed_words(source: str, target: str) -> tuple[list[int], list[int]]:
    """Word indices of the source and of the target that an edit changes (difflib alignment of words)."""
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


def mask_words(tokenizer, source: str, request: EditRequest) -> MaskWords:
    """Token positions defining the edit's mask: blend words, or else the words the edit changes."""
    control, target = request.control, request.target_prompt

    def positions(prompt: str, words) -> list[int]:
        return [p for word in words for p in word_positions(tokenizer, prompt, word)]

    if control.blend_words:
        source_positions = positions(source, control.blend_words)
        target_positions = positions(target, control.blend_words)
    else:
        removed, added = changed_words(source, target)
        source_positions, target_positions = positions(source, removed), positions(target, added)
    return MaskWords(
        source=source_positions,
        target=target_positions,
        source_exclude=positions(source, control.blend_exclude_words),
        target_exclude=positions(target, control.blend_exclude_words),
        threshold=control.blend_threshold,
        exclude_threshold=control.blend_exclude_threshold,
    )


def validate_request(tokenizer, batch_size: int, source_prompts: list[str], position: int, request) -> None:
    """Raise EngineInputError naming `requests[position]` and the fix for anything unusable."""
    where = f"requests[{position}]"
    if not 0 <= request.image_index < batch_size:
        raise EngineInputError(
            f"{where}.image_index={request.image_index} is outside the inverted batch of {batch_size} images."
        )
    if not request.target_prompt or not request.target_prompt.strip():
        raise EngineInputError(
            f"{where}.target_prompt is empty; give the prompt the image should be edited towards."
        )
    prompt_token_ids(tokenizer, request.target_prompt, f"{where}.target_prompt")
    if request.sample_temperature is not None and not request.sample_temperature >= 0.0:
        raise EngineInputError(
            f"{where}.sample_temperature={request.sample_temperature} must be >= 0 (0 samples the mean)."
        )
    if not 0.0 <= request.eta <= 1.0:
        raise EngineInputError(
            f"{where}.eta={request.eta} must be in [0, 1] (eq. 9 of prompt tuning inversion)."
        )
    control = request.control
    if control.mode not in CONTROL_MODES:
        raise EngineInputError(f"{where}.control.mode={control.mode!r}; choose none, replace or refine.")
    windows = [
        ("cross_replace_steps", control.cross_replace_steps),
        ("self_replace_steps", control.self_replace_steps),
        ("unconditional_self_replace_steps", control.unconditional_self_replace_steps),
        ("blend_start", control.blend_start),
        *((f"cross_replace_words[{word!r}]", bounds) for word, bounds in control.cross_replace_words),
    ]
    for name, bounds in windows:
        problem = check_bounds(bounds, f"{where}.control.{name}")
        if problem:
            raise EngineInputError(problem)
    source = source_prompts[request.image_index]
    for kind, words in (
        ("blend_words", control.blend_words),
        ("blend_exclude_words", control.blend_exclude_words),
    ):
        for word in words:
            if not word_positions(tokenizer, source, word) and not word_positions(
                tokenizer, request.target_prompt, word
            ):
                raise EngineInputError(
                    f"{where}.control.{kind}: {word!r} is in neither the source prompt {source!r} nor the "
                    f"target prompt {request.target_prompt!r}."
                )


@dataclass
class EditLayout:
    """Row layout of one edit call: per image a source row followed by its edit rows.

    Attributes:
        row_images: per row, the inverted image it starts from.
        edit_rows: per edit, its row.
        edit_sources: per edit, its image's source row.
        edit_positions: per edit, its position in the caller's request list.
    """

    row_images: list[int] = field(default_factory=list)
    edit_rows: list[int] = field(default_factory=list)
    edit_sources: list[int] = field(default_factory=list)
    edit_positions: list[int] = field(default_factory=list)

    @classmethod
    def build(cls, requests: list[EditRequest], usable: list[bool]) -> EditLayout:
        """Lay out the requests whose image is usable, grouped by image in first-seen order."""
        layout = cls()
        for image in dict.fromkeys(r.image_index for r in requests if usable[r.image_index]):
            source_row = len(layout.row_images)
            layout.row_images.append(image)
            for position, request in enumerate(requests):
                if request.image_index == image:
                    layout.edit_rows.append(len(layout.row_images))
                    layout.edit_sources.append(source_row)
                    layout.edit_positions.append(position)
                    layout.row_images.append(image)
        return layout


def _edit_plan(controls: list[EditControls], layout: EditLayout, device: torch.device) -> EditPlan:
    def stacked(name: str) -> torch.Tensor:
        return torch.stack([getattr(c, name) for c in controls]).to(device)

    def windows(name: str) -> torch.Tensor:
        return torch.tensor([getattr(c, name) for c in controls], device=device, dtype=torch.long)

    return EditPlan(
        num_rows=len(layout.row_images),
        edit_rows=torch.tensor(layout.edit_rows, device=device, dtype=torch.long),
        edit_sources=torch.tensor(layout.edit_sources, device=device, dtype=torch.long),
        cross_matrix=stacked("matrix"),
        cross_alpha=stacked("alpha"),
        equalizer=stacked("scales"),
        cross_window=stacked("window"),
        self_window=windows("self_window"),
        uncond_self_window=windows("uncond_self_window"),
    )


def _value_inputs(
    latents: MethodResult,
    rows: torch.Tensor,
    layout: EditLayout,
    edit_requests: list[EditRequest],
    targets: torch.Tensor,
) -> torch.Tensor | None:
    """(S, rows, L, D) value input per row and step, or None when the method has no separate one.

    Source rows keep the reconstruction's value input; each edit row's comes from the edit hook.
    """
    if latents.value_embeddings is None:
        return None
    values = latents.value_embeddings[:, rows].clone()
    hook = latents.edit_hook
    for slot, (row, request) in enumerate(zip(layout.edit_rows, edit_requests, strict=True)):
        values[:, row] = hook.edit_value_embeddings(
            latents.value_embeddings[:, request.image_index], targets[slot], request
        )
    return values


def run_edits(
    model: DiffusionModel,
    schedule: DDIMSchedule,
    latents: MethodResult,
    source_prompts: list[str],
    guidance_scale: float,
    requests: list[EditRequest],
    layout: EditLayout,
) -> dict[int, EditResult]:
    """Sample every laid-out edit in one batched pass; returns results keyed by request position."""
    steps, device = schedule.num_steps, model.device
    rows = torch.tensor(layout.row_images, device=device)
    edit_requests = [requests[position] for position in layout.edit_positions]
    targets = encode_prompts(model.tokenizer, model.text_encoder, [r.target_prompt for r in edit_requests])
    hook = latents.edit_hook
    cond = latents.cond_embeddings[:, rows].clone()
    uncond = latents.uncond_embeddings[:, rows]
    if any(request.sample_temperature is not None for request in edit_requests):
        uncond = uncond.clone()
    for slot, (row, request) in enumerate(zip(layout.edit_rows, edit_requests, strict=True)):
        cond[:, row] = hook.edit_embeddings(
            latents.cond_embeddings[:, request.image_index], targets[slot], request
        )
        if request.embedding_vae is not None:  # the sample is of C'': the unconditional side stays
            cond[:, row] = request.embedding_vae.sample_sequence(
                cond[:, row], schedule.timesteps, request.seed, request.sample_temperature
            )
        elif request.sample_temperature is not None:
            uncond[:, row] = hook.edit_uncond_embeddings(
                latents.uncond_embeddings[:, request.image_index], request
            )
    sources = [source_prompts[r.image_index] for r in edit_requests]
    controls = [
        edit_controls(model.tokenizer, s, r, steps) for s, r in zip(sources, edit_requests, strict=True)
    ]
    resolution = mask_resolution_for(model.unet, model.latent_size)
    controller = AttentionController(_edit_plan(controls, layout, device), model.latent_size, resolution)
    words = [mask_words(model.tokenizer, s, r) for s, r in zip(sources, edit_requests, strict=True)]
    blended = [slot for slot, r in enumerate(edit_requests) if r.control.blend_words]
    blend = LocalBlend(
        edit_rows=[layout.edit_rows[slot] for slot in blended],
        source_rows=[layout.edit_sources[slot] for slot in blended],
        words=[words[slot] for slot in blended],
        start_step=[int(edit_requests[slot].control.blend_start * steps) for slot in blended],
        resolution=resolution,
        size=model.latent_size,
    )

    source_rows = sorted(set(layout.edit_sources))

    def after_step(step_index: int, z: torch.Tensor) -> torch.Tensor:
        pivot = latents.trajectory[steps - step_index - 1][rows]
        for row in source_rows:
            z[row] = hook.steer_source(z[row], pivot[row])
        for row, request in zip(layout.edit_rows, edit_requests, strict=True):
            z[row] = hook.steer(z[row], pivot[row], request)
        return blend(step_index, z, controller.cross_maps)

    final, first_nonfinite = sample(
        model.unet,
        schedule,
        latents.trajectory[-1][rows],
        cond,
        uncond,
        guidance_scale,
        controller=controller,
        after_step=after_step,
        value_embeddings=_value_inputs(latents, rows, layout, edit_requests, targets),
    )
    images = decode_latents(model, torch.nan_to_num(final[torch.tensor(layout.edit_rows, device=device)]))
    results = {}
    for slot, (row, source_row, position) in enumerate(
        zip(layout.edit_rows, layout.edit_sources, layout.edit_positions, strict=True)
    ):
        request = edit_requests[slot]
        bad_step = int(first_nonfinite[row])
        if bad_step >= 0:
            timestep = int(schedule.timesteps[bad_step])
            message = f"image {request.image_index}: non-finite latents at edit step {bad_step} (timestep {timestep})"
            results[position] = EditResult(request, None, None, message, 0.0)
            continue
        mask = None
        if not words[slot].empty and controller.cross_maps is not None:
            latent_mask = edit_mask(
                controller.cross_maps, source_row, row, words[slot], resolution, model.latent_size
            )
            mask = upsample_mask(latent_mask, model.image_size).cpu()
        results[position] = EditResult(request, images[slot], mask, None, 0.0, final[row].cpu())
    return results
