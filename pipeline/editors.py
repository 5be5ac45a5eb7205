"""Editing with trained DiffusionCLIP editors: one or more fine-tuned models applied in one pass.

    model = load_diffusion_model("pipeline/world/assets/shapes-sd")
    star = load_editor(model, "out/editors/star/artefact")
    blue = load_editor(model, "out/editors/blue/artefact")
    images = edit_with_editors(model, images, [star], [1.0])               # one attribute
    images = edit_with_editors(model, images, [star, blue], [0.5, 0.5])    # both (eq. 14)
    images = edit_with_editors(model, images, [star], [0.3])               # continuous transition

The images go forward to t0 with the original model (eq. 12, S_for steps) and come back (eq. 13, S_gen
steps) with the noise sum_i gamma_i eps_i of the editors plus (1 - sum_i gamma_i) eps of the original
model, so that the weights sum to 1 as eq. 14 requires; t0, S_for, S_gen and the UNet's conditioning
default to what the first editor was trained for (its inference grid: paper (200, 40)). An editor
trained on another base model is refused (`pipeline.training.artefact.check_base_model`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.diffusion.precision import fixed_branch_noise
from pipeline.diffusion.tokens import encode_prompts
from pipeline.methods import diffusion_clip as dc
from pipeline.models.loading import DiffusionModel
from pipeline.models.vae import decode_latents, encode_images
from pipeline.training.artefact import check_base_model, read_artefact, read_manifest
from pipeline.training.diffusion_clip import KIND, load_trained_weights


@dataclass
class Editor:
    """A fine-tuned noise predictor and the artefact it came from.

    Attributes:
        unet: the base UNet with the editor's weights (a copy; the base model is untouched).
        uri: the artefact's URI.
        version: the artefact's version.
        config: the artefact's training config.
    """

    unet: torch.nn.Module
    uri: str
    version: str
    config: dict[str, Any]


def load_editor(model: DiffusionModel, uri: str) -> Editor:
    """Load a DiffusionCLIP artefact onto a copy of `model`'s UNet.

    Raises:
        ArtefactError: missing, of another kind, or trained on another base model.
    """
    check_base_model(read_manifest(uri), uri, model.fingerprint, model.model_id)
    artefact = read_artefact(uri, kind=KIND)
    unet = copy.deepcopy(model.unet)
    adapter = artefact.config["adapter_resolved"]
    load_trained_weights(unet, adapter, artefact.weights, artefact.config)
    unet.eval().requires_grad_(False)
    return Editor(unet=unet, uri=uri, version=artefact.version, config=artefact.config)


def load_editors(model: DiffusionModel, uris: Sequence[str]) -> dict[str, Editor]:
    """Every distinct editor of `uris`, loaded once onto `model` (`load_editor`), by URI.

    Raises:
        ArtefactError: an artefact is missing, of another kind, or trained on another base model.
    """
    return {uri: load_editor(model, uri) for uri in dict.fromkeys(uris)}


@dataclass(frozen=True)
class EditSettings:
    """The grid and conditioning of an edit.

    Attributes:
        return_step: t0.
        forward_steps: S_for.
        generative_steps: S_gen.
        prompt: the UNet's conditioning in both processes.
    """

    return_step: int
    forward_steps: int
    generative_steps: int
    prompt: str

    @classmethod
    def of(cls, editor: Editor, **overrides: Any) -> EditSettings:
        """What `editor` was trained for (its inference grid), with non-None `overrides` applied."""
        trained = editor.config
        settings = {
            "return_step": trained["return_step"],
            "forward_steps": trained["inference_forward_steps"],
            "generative_steps": trained["inference_generative_steps"],
            "prompt": trained["prompt"],
        }
        settings.update({key: value for key, value in overrides.items() if value is not None})
        return cls(**settings)


def _noise_fn(model: DiffusionModel, unet: torch.nn.Module, prompt: str) -> dc.NoiseFn:
    condition = encode_prompts(model.tokenizer, model.text_encoder, [prompt])

    def noise(latents: torch.Tensor, timestep: int) -> torch.Tensor:
        return fixed_branch_noise(unet, latents, timestep, condition.expand(latents.shape[0], -1, -1))

    return noise


def forward_to_return_step(
    model: DiffusionModel, images: torch.Tensor, settings: EditSettings
) -> torch.Tensor:
    """x_t0 of each image by the original model's deterministic forward process (eq. 12).

    Args:
        model: the base model.
        images: (B, H, W, 3) uint8 at the model's resolution.
        settings: t0, S_for and the conditioning.

    Returns:
        (B, C, h, w) latents at t0, reusable for any combination of editors.
    """
    grid = dc.ReturnGrid.from_scheduler(model.scheduler, settings.return_step, settings.forward_steps)
    return dc.forward(_noise_fn(model, model.unet, settings.prompt), grid, encode_images(model, images))


def generate_with_editors(
    model: DiffusionModel,
    start_latents: torch.Tensor,
    editors: Sequence[Editor],
    gammas: Sequence[float],
    settings: EditSettings,
) -> torch.Tensor:
    """Generate from x_t0 with sum_i gamma_i eps_i of the editors and (1 - sum_i gamma_i) eps of the
    original model (eq. 14); returns (B, H, W, 3) uint8 images.

    Args:
        model: the base model the editors were trained on.
        start_latents: x_t0 from `forward_to_return_step` with the same t0 and prompt.
        editors: M loaded editors.
        gammas: M weights in [0, 1] with sum <= 1.
        settings: t0, S_gen and the conditioning.
    """
    if len(gammas) != len(editors):
        raise ValueError(f"need one gamma per editor: {len(editors)} editors, {len(gammas)} gammas")
    if any(not 0.0 <= gamma <= 1.0 for gamma in gammas) or sum(gammas) > 1.0 + 1e-6:
        raise ValueError(f"gammas {list(gammas)} must lie in [0, 1] and sum to at most 1")
    noise_fns = [_noise_fn(model, unet, settings.prompt) for unet in (model.unet, *(e.unet for e in editors))]
    weights = (max(0.0, 1.0 - float(sum(gammas))), *(float(gamma) for gamma in gammas))
    combined = dc.combined_noise_fn(noise_fns, dc.constant_gammas(weights))
    grid = dc.ReturnGrid.from_scheduler(model.scheduler, settings.return_step, settings.generative_steps)
    with torch.no_grad():
        return decode_latents(model, dc.generate(combined, grid, start_latents))


def edit_with_editors(
    model: DiffusionModel,
    images: torch.Tensor,
    editors: Sequence[Editor],
    gammas: Sequence[float],
    settings: EditSettings | None = None,
) -> torch.Tensor:
    """Forward to t0 and generate back with the weighted editors.

    Args:
        model: the base model.
        images: (B, H, W, 3) uint8 at the model's resolution.
        editors: M >= 1 loaded editors.
        gammas: M weights in [0, 1] with sum <= 1; the original model gets 1 - sum.
        settings: grid and conditioning (default: what the first editor was trained for).

    Returns:
        (B, H, W, 3) uint8 edited images.
    """
    if not editors:
        raise ValueError("edit_with_editors needs at least one editor")
    settings = settings or EditSettings.of(editors[0])
    with torch.no_grad():
        start = forward_to_return_step(model, images, settings)
    return generate_with_editors(model, start, editors, gammas, settings)
