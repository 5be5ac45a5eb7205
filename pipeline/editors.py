"""Editing with trained editors: DiffusionCLIP's fine-tuned models (one or more, applied in one pass) and
ZIP's attribute encoders (the frozen model steered through its h-space by a reference image).

    model = load_diffusion_model("pipeline/world/assets/shapes-sd")
    star = load_editor(model, "out/editors/star/artefact")
    blue = load_editor(model, "out/editors/blue/artefact")
    images = edit_with_editors(model, images, [star], [1.0])               # one attribute
    images = edit_with_editors(model, images, [star, blue], [0.5, 0.5])    # both (eq. 14)
    images = edit_with_editors(model, images, [star], [0.3])               # continuous transition
    images = edit_with_editors(model, images, [star, blue], [1.0, 1.0],    # star first, then blue
                               windows=[(250, 999), (0, 249)])
    images = edit_with_editors(model, images, [star, blue], [1.0, 1.0],    # both changes added in full
                               combination="conjunction")

The images go forward to t0 with the original model (eq. 12, S_for steps) and come back (eq. 13, S_gen
steps) with the noise sum_i gamma_i eps_i of the editors plus (1 - sum_i gamma_i) eps of the original
model, so that the weights sum to 1 as eq. 14 requires; t0, S_for, S_gen and the UNet's conditioning
default to what the first editor was trained for (its inference grid: paper (200, 40)). An editor
trained on another base model is refused (`pipeline.training.artefact.check_base_model`).

A ZIP encoder (`load_editor` of a zip_encoder artefact) edits alone: the image goes forward to t0 with
the model, and comes back with the asymmetric step of papers/000 eq. 5 above t_zip, Δh read from the
encoder's own first reference image or a reference the caller gives; its gamma scales Δh (0 = the
model's own reconstruction, 1 = the trained edit).
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
from pipeline.methods import zip_attribute as za
from pipeline.methods.cond_vae import ConditionalEmbeddingVAE, VAESizes
from pipeline.methods.null_text_vae import EmbeddingVAE
from pipeline.models.loading import DiffusionModel
from pipeline.models.vae import decode_latents, encode_images
from pipeline.training import zip_encoder
from pipeline.training.artefact import (
    COND_VAE_KIND,
    NULL_TEXT_VAE_KIND,
    ZIP_ENCODER_KIND,
    ArtefactError,
    check_base_model,
    read_artefact,
    read_manifest,
)
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


@dataclass
class ZipEncoder:
    """A trained ZIP attribute encoder and the artefact it came from.

    Attributes:
        head: E_A's trained layers (`pipeline.methods.zip_attribute.AttributeHead`), frozen.
        reference_images: (R, H, W, 3) uint8, the references rendered at training time; the first is
            the default reference of an edit.
        uri: the artefact's URI.
        version: the artefact's version.
        config: the artefact's training config.
    """

    head: torch.nn.Module
    reference_images: torch.Tensor
    uri: str
    version: str
    config: dict[str, Any]


def load_editor(model: DiffusionModel, uri: str) -> Editor | ZipEncoder:
    """Load a DiffusionCLIP artefact onto a copy of `model`'s UNet, or a ZIP encoder for `model`.

    Raises:
        ArtefactError: missing, of another kind, or trained on another base model.
    """
    manifest = read_manifest(uri)
    check_base_model(manifest, uri, model.fingerprint, model.model_id)
    if manifest["kind"] == ZIP_ENCODER_KIND:
        artefact = read_artefact(uri, kind=ZIP_ENCODER_KIND)
        head = zip_encoder.load_head(artefact.weights, artefact.config).to(model.device)
        references = artefact.weights[zip_encoder.REFERENCES_NAME]
        return ZipEncoder(head, references, uri, artefact.version, artefact.config)
    artefact = read_artefact(uri, kind=KIND)
    unet = copy.deepcopy(model.unet)
    adapter = artefact.config["adapter_resolved"]
    load_trained_weights(unet, adapter, artefact.weights, artefact.config)
    unet.eval().requires_grad_(False)
    return Editor(unet=unet, uri=uri, version=artefact.version, config=artefact.config)


def load_embedding_vae(model: DiffusionModel, uri: str) -> ConditionalEmbeddingVAE:
    """A conditional-embedding VAE artefact (`inversa train`, kind cond_vae) for `model`, frozen; its
    `uri` and `version` attributes name the artefact.

    Raises:
        ArtefactError: missing, of another kind, or trained on another base model.
    """
    return _load_trained_vae(
        model,
        uri,
        COND_VAE_KIND,
        lambda tokens, channels, sizes: ConditionalEmbeddingVAE(tokens, channels, sizes, torch.Generator()),
    )


def load_null_text_vae(model: DiffusionModel, uri: str) -> EmbeddingVAE:
    """A dataset-wide null-text VAE artefact (`inversa train`, kind null_text_vae) for `model`, frozen;
    its `uri`, `version` and `config` (the training config) attributes name the artefact.

    Raises:
        ArtefactError: missing, modified, of another kind, or trained on another base model.
    """
    return _load_trained_vae(
        model,
        uri,
        NULL_TEXT_VAE_KIND,
        lambda tokens, channels, sizes: EmbeddingVAE(
            1, tokens, channels, sizes, torch.zeros(1, tokens, channels), torch.Generator(), add_input=True
        ),
    )


def _load_trained_vae(model: DiffusionModel, uri: str, kind: str, build) -> torch.nn.Module:
    """The embedding VAE of kind `kind` at `uri`, built by `build(tokens, channels, sizes)` from its
    config, with its weights, on the model's device and frozen; `uri`, `version` and `config` set."""
    manifest = read_manifest(uri)
    check_base_model(manifest, uri, model.fingerprint, model.model_id)
    artefact = read_artefact(uri, kind=kind)
    config = artefact.config
    sizes = VAESizes(config["latent_dim"], config["reduced_channels"], config["hidden_dim"])
    vae = build(config["tokens"], config["channels"], sizes)
    vae.load_state_dict(artefact.weights)
    vae.to(model.device).eval().requires_grad_(False)
    vae.uri, vae.version, vae.config = uri, artefact.version, config
    return vae


def load_editors(model: DiffusionModel, uris: Sequence[str]) -> dict[str, Editor | ZipEncoder]:
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
    def of(cls, editor: Editor | ZipEncoder, **overrides: Any) -> EditSettings:
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


def noise_fn_of(model: DiffusionModel, unet: torch.nn.Module, prompt: str) -> dc.NoiseFn:
    """eps_theta(x_t, t) of `unet` (the model's or an editor's) conditioned on `prompt`, for any batch
    of latents (B, C, h, w); the prompt is encoded once."""
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
    return dc.forward(noise_fn_of(model, model.unet, settings.prompt), grid, encode_images(model, images))


def generate_with_editors(
    model: DiffusionModel,
    start_latents: torch.Tensor,
    editors: Sequence[Editor],
    gammas: Sequence[float],
    settings: EditSettings,
    windows: Sequence[dc.Window | None] | None = None,
    combination: dc.Combination = "convex",
) -> torch.Tensor:
    """Generate from x_t0 with sum_i gamma_i(t) eps_i of the editors and 1 - sum_i gamma_i(t) of the
    original model's eps (eq. 14); returns (B, H, W, 3) uint8 images.

    Args:
        model: the base model the editors were trained on.
        start_latents: x_t0 from `forward_to_return_step` with the same t0 and prompt.
        editors: M loaded editors.
        gammas: M weights in [0, 1]; where windows overlap, those active together sum to at most 1.
        settings: t0, S_gen and the conditioning.
        windows: M inclusive timestep windows (low, high) in which each editor's gamma applies (0
            outside; a high beyond the scheduler's last timestep runs to it), None for an editor active
            at every step; None = every editor at every step. E.g. a shape editor on (250, 999) and a
            colour editor on (0, 249) hand the generation from one to the other.
        combination: "convex" (eq. 14 as the paper has it) or "conjunction" (each editor's change
            eps_i - eps_theta added in full, with weight gamma_i >= 0; `dc.windowed_gammas`).
    """
    if len(gammas) != len(editors):
        raise ValueError(f"need one gamma per editor: {len(editors)} editors, {len(gammas)} gammas")
    windows = [dc.ALL_STEPS if window is None else window for window in (windows or [None] * len(editors))]
    schedule = dc.windowed_gammas(gammas, windows, model.scheduler.config.num_train_timesteps, combination)
    noise_fns = [
        noise_fn_of(model, unet, settings.prompt) for unet in (model.unet, *(e.unet for e in editors))
    ]
    combined = dc.combined_noise_fn(noise_fns, schedule)
    grid = dc.ReturnGrid.from_scheduler(model.scheduler, settings.return_step, settings.generative_steps)
    with torch.no_grad():
        return decode_latents(model, dc.generate(combined, grid, start_latents))


def edit_with_editors(
    model: DiffusionModel,
    images: torch.Tensor,
    editors: Sequence[Editor | ZipEncoder],
    gammas: Sequence[float],
    settings: EditSettings | None = None,
    reference: torch.Tensor | None = None,
    windows: Sequence[dc.Window | None] | None = None,
    combination: dc.Combination = "convex",
) -> torch.Tensor:
    """Forward to t0 and generate back with the weighted editors.

    Args:
        model: the base model.
        images: (B, H, W, 3) uint8 at the model's resolution.
        editors: M >= 1 loaded editors.
        gammas: M weights in [0, 1] with sum <= 1 (any weights >= 0 as a conjunction); the original model
            gets 1 - sum.
        settings: grid and conditioning (default: what the first editor was trained for).
        reference: (H, W, 3) uint8, a ZIP encoder's reference image (None = its own first reference).
        windows: DiffusionCLIP editors' timestep windows (`generate_with_editors`); None = every step.
        combination: how DiffusionCLIP editors' noises combine (`generate_with_editors`).

    Returns:
        (B, H, W, 3) uint8 edited images.

    Raises:
        ArtefactError: a ZIP encoder combined with other editors, or a reference without a ZIP encoder.
    """
    if not editors:
        raise ValueError("edit_with_editors needs at least one editor")
    if any(isinstance(editor, ZipEncoder) for editor in editors):
        if len(editors) != 1:
            raise ArtefactError(
                f"a ZIP encoder edits alone, not combined with other editors: {[e.uri for e in editors]}"
            )
        if windows is not None and any(window is not None for window in windows):
            raise ArtefactError("a ZIP encoder takes no timestep window: its steps are set by its t_zip")
        if combination != "convex":
            raise ArtefactError(
                "a ZIP encoder edits alone: combination: conjunction needs DiffusionCLIP editors"
            )
        return edit_with_zip(model, images, editors[0], reference, scale=gammas[0], settings=settings)
    if reference is not None:
        raise ArtefactError("a reference image steers ZIP encoders only, not DiffusionCLIP editors")
    settings = settings or EditSettings.of(editors[0])
    with torch.no_grad():
        start = forward_to_return_step(model, images, settings)
    return generate_with_editors(model, start, editors, gammas, settings, windows, combination)


def zip_reference_code(
    model: DiffusionModel, encoder: ZipEncoder, reference: torch.Tensor | None
) -> torch.Tensor:
    """r of `reference` ((H, W, 3) uint8 at the model's resolution), or of the encoder's first reference."""
    image = encoder.reference_images[0] if reference is None else reference
    return zip_encoder.reference_codes_of(model, image[None])[0]


def generate_with_zip(
    model: DiffusionModel,
    start_latents: torch.Tensor,
    encoder: ZipEncoder,
    code: torch.Tensor,
    scale: float,
    settings: EditSettings,
) -> torch.Tensor:
    """Generate from x_t0 with Δh = scale * E_A(h_t, r) above t_zip (papers/000 eq. 5); (B, H, W, 3) uint8.

    Args:
        model: the base model the encoder was trained on.
        start_latents: x_t0 from `forward_to_return_step` with the same t0 and prompt.
        encoder: the loaded encoder.
        code: r, (C,), from `zip_reference_code`.
        scale: the factor on Δh, in [0, 1].
        settings: t0, S_gen and the conditioning.
    """
    if not 0.0 <= scale <= 1.0:
        raise ValueError(f"a ZIP encoder's gamma (the scale of Δh) must lie in [0, 1], got {scale}")
    noise = noise_fn_of(model, model.unet, settings.prompt)
    paired = za.paired_noise(noise, model.unet, lambda features: scale * encoder.head(features, code))
    grid = dc.ReturnGrid.from_scheduler(model.scheduler, settings.return_step, settings.generative_steps)
    with torch.no_grad():
        latents = za.generate(noise, paired, grid, start_latents, encoder.config["zip_step"])
        return decode_latents(model, latents)


def edit_with_zip(
    model: DiffusionModel,
    images: torch.Tensor,
    encoder: ZipEncoder,
    reference: torch.Tensor | None = None,
    scale: float = 1.0,
    settings: EditSettings | None = None,
) -> torch.Tensor:
    """Forward to t0 and generate back with the encoder's Δh (Algorithm 1 of papers/000).

    Args:
        model: the base model.
        images: (B, H, W, 3) uint8 at the model's resolution.
        encoder: a loaded ZIP encoder.
        reference: (H, W, 3) uint8, the user's reference image; None = the encoder's first reference.
        scale: the factor on Δh (0 = reconstruction, 1 = the trained edit).
        settings: grid and conditioning (default: what the encoder was trained for).

    Returns:
        (B, H, W, 3) uint8 edited images.
    """
    settings = settings or EditSettings.of(encoder)
    code = zip_reference_code(model, encoder, reference)
    with torch.no_grad():
        start = forward_to_return_step(model, images, settings)
    return generate_with_zip(model, start, encoder, code, scale, settings)


def read_reference_image(uri: str, size: int) -> torch.Tensor:
    """A reference image from a path or fsspec URI, as (size, size, 3) uint8 (RGB, resized when needed).

    Raises:
        FileNotFoundError: nothing at `uri`.
        ValueError: the file is not an image PIL can read.
    """
    import io

    import fsspec
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    with fsspec.open(uri, "rb") as handle:
        data = handle.read()
    try:
        image = Image.open(io.BytesIO(data)).convert("RGB")
    except UnidentifiedImageError as error:
        raise ValueError(f"reference {uri!r} is not an image PIL can read") from error
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    return torch.from_numpy(np.asarray(image).copy())
