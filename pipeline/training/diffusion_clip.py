"""DiffusionCLIP editors: fine-tune a copy of the base UNet (all weights or LoRA adapters) towards one
text direction, as a `TrainTask` for `pipeline.training.ray_train`.

On every worker `setup` loads the base model and the CLIP model, renders the training images, and
precomputes the (x_0, x_t0) pairs by the deterministic forward process with S_for steps (eq. 12).
Iteration i draws `batch` pairs with a generator seeded by (seed, i); the worker's share of them is
generated with S_gen steps (eq. 13), decoded by the VAE and scored by eq. 10; `variant` chooses full
backpropagation or the memory-efficient step per generative step (`pipeline.methods.diffusion_clip`).

Text directions: with `reference_text` and `target_text` set, every image gets the paper's fixed pair
(e.g. "face" -> "angry face"). Left unset, each image of the shapes world gets its own caption as
y_ref and the caption with `data.attribute` := `data.value` as y_tar; scenes that already have the
value are not used (their direction is zero). The oracle is never used here.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from pipeline.diffusion.precision import fixed_branch_noise, optimised_branch_noise
from pipeline.methods import diffusion_clip as dc
from pipeline.training.artefact import DIFFUSION_CLIP_KIND
from pipeline.training.prior import PriorConfig, PriorDraws, PriorSources

KIND = DIFFUSION_CLIP_KIND
FACTORY = "pipeline.training.diffusion_clip:build_task"
# Base UNets above this size train LoRA adapters when `adapter` is "auto" (SD 1.5's UNet: 860M).
AUTO_LORA_PARAMETERS = 100_000_000
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class ClipSpec:
    """The open_clip model of the directional loss.

    Attributes:
        model_name: open_clip architecture name.
        pretrained: tag or local checkpoint.
        model_config: JSON config of a custom architecture (registered first), or None.
    """

    model_name: str = "shapes-clip-vit-tiny"
    pretrained: str = "pipeline/world/assets/shapes_clip.safetensors"
    model_config: str | None = "pipeline/world/assets/open_clip/shapes-clip-vit-tiny.json"


@dataclass(frozen=True)
class WorldData:
    """Training images from the shapes world (training seeds, disjoint from the held-out ones).

    Attributes:
        scenes: training images (scenes that already have `value` are skipped and replaced).
        attribute: the attribute the editor changes: shape, color or background.
        value: its target value, e.g. star.
        first_seed: seed of the first scene.
    """

    scenes: int = 64
    attribute: Literal["shape", "color", "background"] = "shape"
    value: str = "star"
    first_seed: int = 0


@dataclass(frozen=True)
class DiffusionClipConfig:
    """One DiffusionCLIP editor's training (papers/004 §3-4; defaults are the paper's).

    Attributes:
        model: the base model (diffusers folder or hub id).
        clip: the CLIP model of the directional loss.
        extra_clips: further CLIP models (not in the paper): L_direction is averaged over `clip` and these,
            each with its own ΔT of the same texts (and the same kept directions and views), so that a
            change one CLIP mistakes for the attribute is rewarded only as far as the others agree
            (`dc.member_rows`).
        data: the training images.
        reference_text: y_ref for every image; None = each image's caption (shapes world).
        target_text: y_tar for every image; None = the caption with the attribute changed.
        text_direction: per_image (each image its own ΔT) or mean (every image the mean of the unit
            directions of all training images: what the captions' other words add to ΔT averages out).
        keep_attributes: shapes-world attributes the edit must keep (e.g. ["color"]): for each value, the
            mean unit direction of the training captions with the attribute changed to it is projected
            out of ΔT (`dc.without_kept_directions`), so that a CLIP which mixes the attribute into the
            target direction no longer rewards changing it.
        keep_texts: (reference, target) text pairs whose directions are projected out of ΔT as well
            (any domain: e.g. ["a red car", "a blue car"]).
        prompt: the conditioning of the UNet in both processes ("" = unconditional).
        clip_views: 0 (the paper: L_direction on the images as they are) or V: L_direction averaged over
            V random views (shift and mirror; `dc.apply_views`) applied alike to x^0 and x_0, drawn
            afresh every iteration from (seed, iteration).
        clip_view_shift: the largest shift of a view in pixels.
        return_step: t0 (paper: 300..600 of 1000).
        forward_steps: S_for of training (paper: 40).
        generative_steps: S_gen of training (paper: 6).
        inference_forward_steps: S_for recorded for editing (paper: 200).
        inference_generative_steps: S_gen recorded for editing (paper: 40).
        l1_weight: lambda_L1 (paper: 0.3).
        direction_weight: weight of L_direction (paper: 1).
        direction_form: cosine (eq. 9's 1 - cos) or log (the reference code's -log((1 + cos) / 2)).
        direction_floor: L_direction counts only above it, max(0, L - floor) (not in the paper): set it to
            1 - the cosine that true edits of the attribute score (`benchmarks/clip_directions.py`), so the
            editor is not pushed past them into changes the CLIP rewards more than the attribute.
        prior: L_prior (not in the paper; weight 0 = off, `pipeline.training.prior`): a frozen copy of the
            original UNet scores x^0's latent at one t per iteration, drawn uniformly from [20, t0] with its
            noise from (seed, iteration) (`dc.prior_loss`), by score distillation or Delta Denoising
            Score; full_backprop only.
        lr: Adam learning rate (paper: 4e-6 for 256 px pixel-space models).
        lr_growth: the learning rate is multiplied by this every `lr_growth_every` iterations (paper:
            "increased linearly by 1.2 per 50 iterations"; the reference code's StepLR, gamma 1.2, per
            epoch of 50 images); 1 keeps it constant. Set from the iteration, so a resumed run agrees.
        lr_growth_every: iterations between growth steps.
        batch: pairs per iteration over all workers (a multiple of the worker count).
        variant: full_backprop (one loss through all S_gen steps) or memory_efficient (a loss and an
            optimiser step per generative step).
        adapter: full (fine-tune every UNet weight), lora (low-rank adapters, peft) or auto (lora for
            UNets above 100M parameters).
        lora_rank: rank of the adapters.
        lora_alpha: peft's lora_alpha (scale alpha / rank).
        seed: seeds the adapters' initialisation and every iteration's batch.
    """

    model: str = "pipeline/world/assets/shapes-sd"
    clip: ClipSpec = dataclasses.field(default_factory=ClipSpec)
    extra_clips: tuple[ClipSpec, ...] = ()
    data: WorldData = dataclasses.field(default_factory=WorldData)
    reference_text: str | None = None
    target_text: str | None = None
    text_direction: Literal["per_image", "mean"] = "per_image"
    keep_attributes: tuple[str, ...] = ()
    keep_texts: tuple[tuple[str, str], ...] = ()
    prompt: str = ""
    clip_views: int = 0
    clip_view_shift: int = 4
    return_step: int = 500
    forward_steps: int = 40
    generative_steps: int = 6
    inference_forward_steps: int = 200
    inference_generative_steps: int = 40
    l1_weight: float = 0.3
    direction_weight: float = 1.0
    direction_form: Literal["cosine", "log"] = "cosine"
    direction_floor: float = 0.0
    prior: PriorConfig = dataclasses.field(default_factory=PriorConfig)
    lr: float = 4e-6
    lr_growth: float = 1.0
    lr_growth_every: int = 50
    batch: int = 8
    variant: Literal["full_backprop", "memory_efficient"] = "full_backprop"
    adapter: Literal["auto", "full", "lora"] = "auto"
    lora_rank: int = 8
    lora_alpha: float = 8.0
    seed: int = 0

    def with_absolute_paths(self, base: Path) -> DiffusionClipConfig:
        """Relative local paths (model, CLIP files) made absolute against `base`."""
        return _absolute_paths(self, base)

    def __post_init__(self) -> None:
        if (self.reference_text is None) != (self.target_text is None):
            raise ValueError("set both reference_text and target_text, or neither (shapes-world captions)")
        if not 1 <= self.return_step < 1000:
            raise ValueError(f"return_step={self.return_step} must be in [1, 999] (paper: 300..600)")
        check_kept_attributes(self.keep_attributes, self.data.attribute)
        if not 0.0 <= self.direction_floor < 2.0:
            raise ValueError(
                f"direction_floor={self.direction_floor} must be in [0, 2) (L_direction's range)"
            )
        check_prior_variant(self.prior, self.variant)
        if self.lr_growth <= 0 or self.lr_growth_every < 1:
            raise ValueError(
                f"lr_growth={self.lr_growth} must be > 0 and lr_growth_every={self.lr_growth_every} >= 1"
            )
        if self.clip_views < 0 or self.clip_view_shift < 0:
            raise ValueError(
                f"clip_views={self.clip_views} and clip_view_shift={self.clip_view_shift} must be >= 0"
            )


def check_prior_variant(prior: PriorConfig, variant: str) -> None:
    """L_prior scores the pass's final latents: only the full-backpropagation variant has them."""
    if prior.weight and variant != "full_backprop":
        raise ValueError(f"prior.weight={prior.weight} needs variant full_backprop (got {variant})")


def prior_draws(task, frozen_unet: torch.nn.Module) -> PriorDraws:
    """L_prior's draws of a set-up DiffusionCLIP or ZIP task on its worker: the task's training images'
    latents (`task.source_latents`, (N, C, h, w)) and (y_ref, y_tar) texts, and its prompt's embeddings."""
    config = task.config
    _, _, references, targets = training_texts(config)
    sources = PriorSources(task.source_latents, references, targets)
    return PriorDraws(
        config.prior,
        task.model,
        frozen_unet,
        task.condition,
        sources,
        config.seed,
        config.batch,
        config.return_step,
        task.rank,
        task.world_size,
    )


def check_kept_attributes(keep_attributes: tuple[str, ...], attribute: str) -> None:
    """Kept attributes are shapes-world attributes other than the edited one."""
    from pipeline.world.generator import EDITABLE_ATTRIBUTES

    for kept in keep_attributes:
        if kept not in EDITABLE_ATTRIBUTES:
            raise ValueError(f"keep_attributes: {kept!r} is not one of {list(EDITABLE_ATTRIBUTES)}")
        if kept == attribute:
            raise ValueError(f"keep_attributes: {kept!r} is the attribute being edited (data.attribute)")


def resolved_path(value: str | None, base: Path) -> str | None:
    """`value` made absolute against `base` when it is a relative path of a local file there (Ray
    workers run in another folder); hub ids, tags, URIs and absolute paths are left as they are."""
    if value is None or "://" in value or Path(value).is_absolute() or not (base / value).exists():
        return value
    return str((base / value).resolve())


def _absolute_paths(config: DiffusionClipConfig, base: Path) -> DiffusionClipConfig:
    """The config with relative paths of local files made absolute against `base` (see `resolved_path`)."""

    def resolved_clip(spec: ClipSpec) -> ClipSpec:
        return dataclasses.replace(
            spec,
            pretrained=resolved_path(spec.pretrained, base),
            model_config=resolved_path(spec.model_config, base),
        )

    changes: dict[str, Any] = {"model": resolved_path(config.model, base)}
    # Every CLIP the config names, alone or in a tuple, whatever its field is called.
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, ClipSpec):
            changes[field.name] = resolved_clip(value)
        elif isinstance(value, tuple) and value and all(isinstance(spec, ClipSpec) for spec in value):
            changes[field.name] = tuple(resolved_clip(spec) for spec in value)
    return dataclasses.replace(config, **changes)


def config_from_mapping(mapping: dict[str, Any]) -> DiffusionClipConfig:
    """The config from its JSON form (nested dataclasses rebuilt)."""
    return DiffusionClipConfig(**task_fields(mapping))


def task_fields(mapping: dict[str, Any]) -> dict[str, Any]:
    """A training config's JSON form with its nested dataclasses and tuples rebuilt."""
    fields = dict(mapping)
    fields["clip"] = ClipSpec(**fields.get("clip", {}))
    if "extra_clips" in fields:
        fields["extra_clips"] = tuple(ClipSpec(**spec) for spec in fields["extra_clips"])
    fields["data"] = WorldData(**fields.get("data", {}))
    if "prior" in fields:
        fields["prior"] = PriorConfig(**fields["prior"])
    fields["keep_attributes"] = tuple(fields.get("keep_attributes", ()))
    fields["keep_texts"] = tuple(tuple(pair) for pair in fields.get("keep_texts", ()))
    return fields


def resolved_adapter(config: DiffusionClipConfig, unet: torch.nn.Module) -> str:
    """ "full" or "lora": `adapter`, with auto decided by the UNet's size."""
    if config.adapter != "auto":
        return config.adapter
    parameters = sum(parameter.numel() for parameter in unet.parameters())
    return "lora" if parameters > AUTO_LORA_PARAMETERS else "full"


def lora_config(rank: int, alpha: float):
    """peft's LoraConfig of the adapters on the attention projections."""
    from peft import LoraConfig

    return LoraConfig(
        r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(LORA_TARGETS)
    )


def make_trainable(unet: torch.nn.Module, adapter: str, rank: int, alpha: float) -> list[torch.nn.Parameter]:
    """Unfreeze every weight (full) or add zero-initialised-output LoRA adapters (lora); the trained ones."""
    if adapter == "full":
        unet.requires_grad_(True)
    else:
        unet.requires_grad_(False)
        unet.add_adapter(lora_config(rank, alpha))  # adapters are the only trainable weights
    return [parameter for parameter in unet.parameters() if parameter.requires_grad]


def trained_weights(unet: torch.nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """The tensors an editor artefact stores: the whole UNet, or its adapters only."""
    if adapter == "full":
        return {name: tensor.detach().clone() for name, tensor in unet.state_dict().items()}
    from peft.utils import get_peft_model_state_dict

    return {name: tensor.detach().clone() for name, tensor in get_peft_model_state_dict(unet).items()}


def load_trained_weights(unet: torch.nn.Module, adapter: str, weights: dict[str, torch.Tensor], config: dict):
    """Put an artefact's weights into `unet` (a copy of its base UNet); returns it."""
    if adapter == "full":
        unet.load_state_dict(weights)
        return unet
    from peft.utils import set_peft_model_state_dict

    unet.add_adapter(lora_config(config["lora_rank"], config["lora_alpha"]))
    result = set_peft_model_state_dict(unet, weights)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"adapter weights do not fit the UNet: {result.unexpected_keys[:3]}")
    return unet


def world_training_texts(
    data: WorldData, exclude: frozenset[str] = frozenset()
) -> tuple[np.ndarray, list[str], list[str]]:
    """Rendered shapes-world training images and their (y_ref, y_tar) captions.

    Scenes whose primary object (or background) already has the value are skipped, so every direction
    is non-zero; one-object scenes only, since the edit changes the primary object.

    Returns:
        images uint8 (N, 64, 64, 3), reference captions, target captions.
    """
    from pipeline.world import generator

    images, references, targets = [], [], []
    seed = data.first_seed
    while len(images) < data.scenes:
        scene = generator.sample_scene(seed, two_object_fraction=0.0, exclude_captions=exclude)
        seed += 1
        current = (
            scene.background if data.attribute == "background" else getattr(scene.objects[0], data.attribute)
        )
        if current == data.value:
            continue
        source = generator.render(scene)
        images.append(source.image)
        references.append(source.caption)
        targets.append(generator.counterfactual(scene, data.attribute, data.value).caption)
    return np.stack(images), references, targets


def _at_resolution(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 images (N, H, W, 3) resized (antialiased) to size x size when they are not."""
    if images.shape[1:3] == (size, size):
        return images
    pixels = torch.as_tensor(images).permute(0, 3, 1, 2).float()
    resized = torch.nn.functional.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True)
    return resized.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def check_batch(batch: int, world_size: int) -> None:
    """Every worker takes an equal share of each batch."""
    if batch % world_size:
        raise ValueError(f"batch={batch} must be a multiple of the {world_size} workers")


def load_clip(spec: ClipSpec, device: torch.device):
    """The ClipScorer of the direction loss."""
    from pipeline.metrics.clip import ClipScorer

    return ClipScorer(spec.model_name, spec.pretrained, device, model_config=spec.model_config)


def training_images_and_directions(config, clip) -> tuple[np.ndarray, torch.Tensor]:
    """The training images and their text directions ΔT (ΔT_keep when the config keeps attributes).

    References and targets are the fixed pair `reference_text` / `target_text` when set, else each
    shapes-world caption and its counterfactual.

    Returns:
        images uint8 (N, 64, 64, 3), directions (N, D).
    """
    images, captions, references, targets = training_texts(config)
    return images, _directions_by(clip, config, captions, references, targets)


def load_clips(config, device: torch.device, clip) -> list:
    """The CLIPs of the direction loss: `clip` (already loaded from `config.clip`) and `config.extra_clips`."""
    return [clip] + [load_clip(spec, device) for spec in config.extra_clips]


def ensemble_image_embed(clips: list) -> dc.EmbedFn:
    """E_I of the direction loss over K CLIPs: images (B, 3, H, W) in [0, 1] -> member-major rows
    (K * B, max_k D_k), with gradients (`dc.ensemble_embed`)."""
    return dc.ensemble_embed([clip.differentiable_image_embeddings for clip in clips])


def ensemble_images_and_directions(config, clips: list) -> tuple[np.ndarray, torch.Tensor]:
    """`training_images_and_directions` by each of K CLIPs (the images rendered once), their ΔT stacked as
    `dc.member_rows` pads them.

    Returns:
        images uint8 (N, 64, 64, 3), directions (K, N, max_k D_k).
    """
    images, captions, references, targets = training_texts(config)
    directions = [_directions_by(clip, config, captions, references, targets) for clip in clips]
    return images, dc.member_rows(directions).unflatten(0, (len(clips), -1))


def training_texts(config) -> tuple[np.ndarray, list[str], list[str], list[str]]:
    """The training images, their captions, and the (y_ref, y_tar) texts of their directions."""
    images, captions, counterfactuals = world_training_texts(config.data)
    references, targets = captions, counterfactuals
    if config.reference_text is not None:
        references, targets = [config.reference_text] * len(images), [config.target_text] * len(images)
    return images, captions, references, targets


def _directions_by(
    clip, config, captions: list[str], references: list[str], targets: list[str]
) -> torch.Tensor:
    """ΔT (ΔT_keep when the config keeps attributes) of the texts by one CLIP, (N, D)."""
    kept = kept_directions(clip, captions, config.keep_attributes, config.keep_texts)
    return text_directions(clip, references, targets, config.text_direction, kept)


def attribute_changes(captions: list[str], attribute: str) -> list[tuple[list[str], list[str]]]:
    """For each value of a shapes-world attribute, the one-object captions whose attribute differs from
    it and the same captions with the attribute changed to it.

    Returns:
        one (references, targets) pair of equal-length lists per value that some caption lacks.
    """
    from pipeline.world import generator

    fields = [generator.one_object_fields(caption) for caption in captions]
    changes = []
    for value in generator.ATTRIBUTE_VALUES[attribute]:
        references, targets = [], []
        for caption, caption_fields in zip(captions, fields, strict=True):
            if caption_fields[attribute] != value:
                references.append(caption)
                targets.append(generator.one_object_caption(**(caption_fields | {attribute: value})))
        if references:
            changes.append((references, targets))
    return changes


def kept_directions(
    clip, captions: list[str], keep_attributes: tuple[str, ...], keep_texts: tuple[tuple[str, str], ...]
) -> torch.Tensor | None:
    """The directions projected out of ΔT: per kept attribute and value, the mean unit direction of the
    captions changed to that value; per kept text pair, its unit direction.

    Returns:
        (K, D), or None when nothing is kept.
    """
    groups = [change for attribute in keep_attributes for change in attribute_changes(captions, attribute)]
    groups += [([reference], [target]) for reference, target in keep_texts]
    rows = []
    with torch.no_grad():
        for references, targets in groups:
            directions = clip.text_embeddings(targets) - clip.text_embeddings(references)
            rows.append(torch.nn.functional.normalize(directions, dim=-1).mean(dim=0))
    return torch.stack(rows) if rows else None


def text_directions(
    clip, references: list[str], targets: list[str], mode: str, kept: torch.Tensor | None = None
) -> torch.Tensor:
    """ΔT = E_T(target) - E_T(reference) per image, (N, D); `mean`: every row the mean unit direction;
    with `kept` (K, D), ΔT_keep (`dc.without_kept_directions`)."""
    with torch.no_grad():
        directions = clip.text_embeddings(targets) - clip.text_embeddings(references)
    if mode == "mean":
        mean = torch.nn.functional.normalize(directions, dim=-1).mean(dim=0, keepdim=True)
        directions = mean.expand_as(directions).clone()
    if kept is not None:
        directions = dc.without_kept_directions(directions, kept.to(directions))
    return directions


def differentiable_decode(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """DEC(latents) -> images in [-1, 1], (B, 3, H, W), with gradients."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return vae.decode(latents / vae.config.scaling_factor + shift).sample


def load_base_model(task, device: torch.device, rank: int, world_size: int, frozen: bool) -> None:
    """The setup every TrainTask shares: the batch split checked, then `task.rank`, `task.world_size`,
    `task.model` (the base model; every weight frozen when `frozen`) and `task.base_fingerprint` set
    from `task.config`."""
    from pipeline.models.loading import load_diffusion_model

    check_batch(task.config.batch, world_size)
    task.rank, task.world_size = rank, world_size
    task.model = load_diffusion_model(task.config.model, device=device)
    if frozen:
        for module in (task.model.unet, task.model.vae, task.model.text_encoder):
            module.requires_grad_(False)
    task.base_fingerprint = task.model.fingerprint


def load_task_models(task, device: torch.device, rank: int, world_size: int, frozen: bool) -> None:
    """The setup the CLIP-guided TrainTasks share: `load_base_model`, then `task.clip` (the loss's CLIP
    model) from `task.config`."""
    load_base_model(task, device, rank, world_size, frozen)
    task.clip = load_clip(task.config.clip, device)


class DiffusionClipTask:
    """The TrainTask of one DiffusionCLIP editor (see the module docstring)."""

    kind = KIND

    def __init__(self, config: DiffusionClipConfig) -> None:
        self.config = config

    def setup(self, device: torch.device, rank: int, world_size: int) -> None:
        config = self.config
        load_task_models(self, device, rank, world_size, frozen=False)
        self.clips = load_clips(config, device, self.clip)
        self._prepare_pairs()
        self.prior = None
        if config.prior.weight:
            # L_prior's original model, copied before any weight (or adapter) is trained.
            base_unet = copy.deepcopy(self.model.unet).requires_grad_(False)
            self.prior = prior_draws(self, base_unet)
        torch.manual_seed(config.seed)
        self.adapter = resolved_adapter(config, self.model.unet)
        self.parameters = make_trainable(self.model.unet, self.adapter, config.lora_rank, config.lora_alpha)
        self.optimizer = torch.optim.Adam(self.parameters, lr=config.lr)
        self.grid = dc.ReturnGrid.from_scheduler(
            self.model.scheduler, config.return_step, config.generative_steps
        )

    def _prepare_pairs(self) -> None:
        """x_0 (images and latents), x_t0 by eq. 12, and E_I(x_0) and ΔT of every training image by every
        CLIP of the loss, (K, N, D) (`dc.member_rows`' padding)."""
        from pipeline.diffusion.tokens import encode_prompts
        from pipeline.models.vae import encode_images

        config, model = self.config, self.model
        images, self.text_directions = ensemble_images_and_directions(config, self.clips)
        self.embed = ensemble_image_embed(self.clips)
        images = _at_resolution(images, model.image_size)
        pixels = torch.as_tensor(images).permute(0, 3, 1, 2).float().to(model.device) / 255.0
        self.condition = encode_prompts(model.tokenizer, model.text_encoder, [config.prompt])
        forward_grid = dc.ReturnGrid.from_scheduler(model.scheduler, config.return_step, config.forward_steps)
        latents = encode_images(model, torch.as_tensor(images))
        self.source_latents = latents
        self.start_latents = torch.cat(
            [
                dc.forward(self._noise_fn(fixed_branch_noise), forward_grid, chunk)
                for chunk in latents.split(16)
            ]
        )
        self.source_images = pixels * 2.0 - 1.0
        with torch.no_grad():
            self.source_embeddings = self.embed(pixels).unflatten(0, (len(self.clips), -1))

    def _noise_fn(self, branch) -> dc.NoiseFn:
        def noise(latents: torch.Tensor, timestep: int) -> torch.Tensor:
            condition = self.condition.expand(latents.shape[0], -1, -1)
            return branch(self.model.unet, latents, timestep, condition)

        return noise

    def prior_term(self, iteration: int) -> dc.PriorTerm | None:
        """L_prior's draw for this worker's rows of `iteration`, or None without a prior."""
        if not self.config.prior.weight:
            return None
        return self.prior.term(iteration, torch.as_tensor(self.rows(iteration)))

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        return differentiable_decode(self.model.vae, latents)

    def rows(self, iteration: int) -> np.ndarray:
        """This worker's rows of iteration `iteration`'s batch (the batch depends on (seed, iteration))."""
        generator = np.random.default_rng([self.config.seed, iteration])
        batch = generator.choice(len(self.start_latents), size=self.config.batch, replace=False)
        return batch[self.rank :: self.world_size]

    def direction_terms(
        self, rows: torch.Tensor, iteration: int
    ) -> tuple[dc.EmbedFn, torch.Tensor, torch.Tensor]:
        """(E_I, E_I(x_0), ΔT) of the direction loss for this worker's rows: as they are, or with every
        image seen through `clip_views` views drawn from (seed, iteration), view-major (V * B rows);
        with several CLIPs, their rows member-major (K * B or K * V * B rows)."""
        config, embed = self.config, self.embed
        if not config.clip_views:
            return (
                embed,
                self.source_embeddings[:, rows].flatten(0, 1),
                self.text_directions[:, rows].flatten(0, 1),
            )
        seed = int(np.random.default_rng([config.seed, iteration]).integers(2**62))
        views = dc.random_views(
            config.clip_views, config.clip_view_shift, torch.Generator().manual_seed(seed)
        )
        with torch.no_grad():
            sources = embed(dc.apply_views((self.source_images[rows] + 1.0) / 2.0, views))
        directions = self.text_directions[:, rows].repeat(1, len(views), 1).flatten(0, 1)
        return (lambda images: embed(dc.apply_views(images, views))), sources, directions

    def step(self, iteration: int, sync) -> dict[str, float]:
        rows = torch.as_tensor(self.rows(iteration))
        embed, source_embeddings, text_directions = self.direction_terms(rows, iteration)
        inputs = dc.LossInputs(
            source_images=self.source_images[rows],
            source_embeddings=source_embeddings,
            text_direction=text_directions,
            l1_weight=self.config.l1_weight,
            direction_weight=self.config.direction_weight,
            direction_form=self.config.direction_form,
            direction_floor=self.config.direction_floor,
        )
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate(iteration)
        arguments = (
            self._noise_fn(optimised_branch_noise),
            self.grid,
            self.start_latents[rows],
            self._decode,
            embed,
            inputs,
        )
        if self.config.variant == "full_backprop":
            losses = [dc.full_backprop_loss(*arguments, prior=self.prior_term(iteration))]
        else:
            losses = dc.memory_efficient_losses(*arguments)
        totals: dict[str, float] = {}
        count = 0
        for loss, terms in losses:
            self.optimizer.zero_grad()
            loss.backward()
            sync()
            self.optimizer.step()
            count += 1
            for name, value in {"loss": loss.detach(), **terms}.items():
                totals[name] = totals.get(name, 0.0) + float(value)
        return {name: value / count for name, value in totals.items()}

    def learning_rate(self, iteration: int) -> float:
        """lr * lr_growth ** (iteration // lr_growth_every), iterations counted from 0."""
        return self.config.lr * self.config.lr_growth ** (iteration // self.config.lr_growth_every)

    def trained_parameters(self) -> list[torch.nn.Parameter]:
        return self.parameters

    def state_dict(self) -> dict[str, Any]:
        return {
            "weights": trained_weights(self.model.unet, self.adapter),
            "optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Both loads copy into the existing parameters, so the optimiser keeps referring to them.
        if self.adapter == "full":
            self.model.unet.load_state_dict(state["weights"])
        else:
            from peft.utils import set_peft_model_state_dict

            set_peft_model_state_dict(self.model.unet, state["weights"])
        self.optimizer.load_state_dict(state["optimizer"])

    def artefact(self) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
        config = dataclasses.asdict(self.config) | {"adapter_resolved": self.adapter}
        return trained_weights(self.model.unet, self.adapter), config, self.base_fingerprint


def build_task(mapping: dict[str, Any]) -> DiffusionClipTask:
    """The factory `ray_train` calls on every worker."""
    return DiffusionClipTask(config_from_mapping(mapping))
