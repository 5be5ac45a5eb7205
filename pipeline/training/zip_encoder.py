"""ZIP attribute encoders: train E_A's last layers with the diffusion model frozen (papers/000, Algorithm 1),
as a `TrainTask` for `pipeline.training.ray_train`.

On every worker `setup` loads the base model and the CLIP model, renders `references` reference images
from `reference_prompt` with the base model itself (the paper's Visual Generator, Algorithm 1 line 2:
seeded DDIM sampling with classifier-free guidance), reads those and any `given_references` (the user's
images) into their reference codes r (line 3),
renders the training images and inverts them to x_t0 by the deterministic forward process with S_for
steps. Iteration i draws `batch` images and, for each, one of the references, with a generator seeded
by (seed, i); the worker's share of them goes through one generative pass with S_gen steps, the loss of
eq. 6 backpropagated at every level above t_zip, and E_A takes one optimiser step
(`pipeline.methods.zip_attribute.training_losses`). The UNet, VAE and text encoder are never updated:
the artefact records the base model's fingerprint, and editing refuses any other model.

Text directions are DiffusionCLIP's (`pipeline.training.diffusion_clip.world_training_texts`): each
shapes-world image's caption as t_source and the caption with `data.attribute` := `data.value` as
t_target, or a fixed pair (`reference_text`, `target_text`); `text_direction: mean` averages them.
The oracle is never used here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from pipeline.diffusion.precision import fixed_branch_noise, optimised_branch_noise
from pipeline.methods import diffusion_clip as dc
from pipeline.methods import zip_attribute as za
from pipeline.training import diffusion_clip as dct
from pipeline.training.artefact import ZIP_ENCODER_KIND
from pipeline.training.diffusion_clip import ClipSpec, WorldData
from pipeline.training.prior import PriorConfig

KIND = ZIP_ENCODER_KIND
FACTORY = "pipeline.training.zip_encoder:build_task"
HEAD_PREFIX = "head."
REFERENCES_NAME = "reference_images"


@dataclass(frozen=True)
class TeacherConfig:
    """L_teacher of a ZIP encoder's training (not in the paper; weight 0 = off, the paper's loss).

    The teacher is the frozen base model itself: each training image inverted with its caption and edited
    by a Prompt-to-Prompt word swap to its y_tar, once, before training. The encoder learns to make that
    edit through h-space from the caption-free pass with Δh, so it applies to images without captions.

    Attributes:
        weight: lambda_teacher, on the mean squared error of the pass's images in [-1, 1].
        inversion: the registered inversion method of the teacher's edits.
        steps: their DDIM steps.
        guidance: their classifier-free guidance w.
        cross_replace: Prompt-to-Prompt's cross-attention replacement fraction of the steps.
        self_replace: its self-attention replacement fraction.
        copy_attributes: attributes (of the shapes-world grammar) the teacher's target takes from the
            reference the image is paired with: with `color`, an image drawn with a reference rendered from
            "a blue star ..." is taught the swap to "a blue star ..." of its own caption, so the edit must
            read the reference to match its teacher (the style of the attribute follows the reference, the
            paper's Fig. 5). Every reference prompt must then be a one-object caption.
    """

    weight: float = 0.0
    inversion: str = "direct"
    steps: int = 20
    guidance: float = 7.5
    cross_replace: float = 0.8
    self_replace: float = 0.4
    copy_attributes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"teacher.weight={self.weight} must be >= 0 (0 = no teacher)")
        if self.steps < 1:
            raise ValueError(f"teacher.steps={self.steps} must be >= 1")


@dataclass(frozen=True)
class GivenReference:
    """A reference image the user gives for training, beside those the Visual Generator renders (the
    paper's "or given by the user").

    Attributes:
        image: path or fsspec URI of an image (resized to the model's resolution when it differs).
        prompt: what it shows, in the words of `reference_prompts` (with `teacher.copy_attributes`, the
            caption whose copied attributes the teacher's targets take).
    """

    image: str
    prompt: str


@dataclass(frozen=True)
class ZipEncoderConfig:
    """One ZIP attribute encoder's training (papers/000 §4, Algorithm 1).

    Attributes:
        model: the base model (diffusers folder or hub id); frozen.
        clip: the CLIP model of the direction loss.
        extra_clips: further CLIP models; L_direction is averaged over all (see DiffusionClipConfig).
        data: the training images.
        reference_prompt: t_target of the Visual Generator: the prompt the reference images are rendered
            from.
        reference_prompts: several t_target prompts (replacing `reference_prompt` when given), e.g. the
            target in each colour: `references` images are rendered from each, prompt after prompt.
        given_references: reference images the user gives, read in after the rendered ones, each with
            the prompt it shows; trained on like them (editing still uses the first rendered one).
        references: how many reference images are rendered per prompt (seeds reference_seed,
            reference_seed + 1, ...); each iteration pairs every training image with one of all of them,
            so the encoder reads references it was not tuned to one by one. Editing uses the first
            unless the edit gives its own.
        reference_seed: seed of the first reference's starting noise.
        reference_steps: DDIM steps of the reference rendering.
        reference_guidance: classifier-free guidance w of the reference rendering.
        reference_text: t_source for every image; None = each image's caption (shapes world).
        target_text: t_target for every image; None = the caption with the attribute changed.
        text_direction: per_image or mean (see DiffusionClipConfig).
        keep_attributes: attributes whose caption directions are projected out of ΔT (see
            DiffusionClipConfig).
        keep_texts: (reference, target) pairs whose directions are projected out of ΔT.
        prompt: the UNet's conditioning in both processes ("" = unconditional).
        return_step: t0, where generation starts (paper Fig. 4: 600 of 1000).
        zip_step: t_zip; Δh acts at timesteps above it (paper Fig. 4: 300).
        forward_steps: S_for of training.
        generative_steps: S_gen of training.
        inference_forward_steps: S_for recorded for editing.
        inference_generative_steps: S_gen recorded for editing.
        clip_weight: lambda_clip of eq. 6.
        recon_weight: lambda_recon of eq. 6.
        variant: per_step (eq. 6 at each step above t_zip on its predicted x_0) or full_backprop (eq. 6
            on the pass's final images, differentiated through every generative step).
        reference_norm: none (the paper's r) or standardise (r^ of
            `pipeline.methods.zip_attribute`: r standardised over the training references, for references
            that differ in a style the edit should copy).
        hidden: width of the head's inner layers (None = min(C, 256)).
        lr: Adam learning rate.
        batch: images per iteration over all workers (a multiple of the worker count).
        seed: seeds the head's initialisation and every iteration's draw.
        prior: L_prior (not in the paper; weight 0 = off, `pipeline.training.prior`): the frozen model scores
            the final latent of the pass with Δh; full_backprop only.
        teacher: L_teacher (not in the paper; weight 0 = off): the frozen model's own word-swap edits of
            the training images as targets of the pass with Δh; full_backprop only.
    """

    model: str = "pipeline/world/assets/shapes-sd"
    clip: ClipSpec = dataclasses.field(default_factory=ClipSpec)
    extra_clips: tuple[ClipSpec, ...] = ()
    data: WorldData = dataclasses.field(default_factory=WorldData)
    reference_prompt: str = "a yellow star on a white background"
    reference_prompts: tuple[str, ...] = ()
    given_references: tuple[GivenReference, ...] = ()
    references: int = 8
    reference_seed: int = 0
    reference_steps: int = 50
    reference_guidance: float = 5.0
    reference_text: str | None = None
    target_text: str | None = None
    text_direction: Literal["per_image", "mean"] = "mean"
    keep_attributes: tuple[str, ...] = ()
    keep_texts: tuple[tuple[str, str], ...] = ()
    prompt: str = ""
    return_step: int = 600
    zip_step: int = 300
    forward_steps: int = 40
    generative_steps: int = 6
    inference_forward_steps: int = 100
    inference_generative_steps: int = 40
    clip_weight: float = 1.0
    recon_weight: float = 0.3
    variant: Literal["per_step", "full_backprop"] = "full_backprop"
    reference_norm: Literal["none", "standardise"] = "none"
    hidden: int | None = None
    lr: float = 1e-3
    batch: int = 8
    seed: int = 0
    prior: PriorConfig = dataclasses.field(default_factory=PriorConfig)
    teacher: TeacherConfig = dataclasses.field(default_factory=TeacherConfig)

    def with_absolute_paths(self, base: Path) -> ZipEncoderConfig:
        """Relative local paths (model, CLIP files, given references) made absolute against `base`.

        Raises:
            ConfigError: a given reference's local file does not exist.
        """
        from pipeline.config import ConfigError
        from pipeline.training.diffusion_clip import _absolute_paths, resolved_path

        given = []
        for index, reference in enumerate(self.given_references):
            image = resolved_path(reference.image, base)
            if "://" not in image and not Path(image).is_file():
                raise ConfigError(
                    f"zip_encoder.given_references.{index}.image: no file {reference.image!r} (relative "
                    f"paths are read against {base}); give an image's path or a URI"
                )
            given.append(dataclasses.replace(reference, image=image))
        return dataclasses.replace(_absolute_paths(self, base), given_references=tuple(given))

    def __post_init__(self) -> None:
        if (self.reference_text is None) != (self.target_text is None):
            raise ValueError("set both reference_text and target_text, or neither (shapes-world captions)")
        if not 0 <= self.zip_step < self.return_step < 1000:
            raise ValueError(
                f"need 0 <= zip_step < return_step < 1000, got zip_step={self.zip_step}, "
                f"return_step={self.return_step} (paper Fig. 4: 300 and 600)"
            )
        if self.references < 1:
            raise ValueError(f"references={self.references} must be >= 1")
        dct.check_kept_attributes(self.keep_attributes, self.data.attribute)
        dct.check_prior_variant(self.prior, self.variant)
        if self.teacher.weight and self.variant != "full_backprop":
            raise ValueError(
                f"teacher.weight={self.teacher.weight} needs variant full_backprop (got {self.variant})"
            )
        if self.teacher.copy_attributes:
            check_copied_attributes(self)

    @property
    def prompts(self) -> tuple[str, ...]:
        """The Visual Generator's prompts: `reference_prompts`, or `reference_prompt` alone."""
        return self.reference_prompts or (self.reference_prompt,)

    @property
    def prompt_of_each_reference(self) -> tuple[str, ...]:
        """The prompt of every training reference, in their order: `references` rendered per prompt,
        prompt after prompt, then the given ones."""
        rendered = tuple(prompt for prompt in self.prompts for _ in range(self.references))
        return rendered + tuple(reference.prompt for reference in self.given_references)


def check_copied_attributes(config: ZipEncoderConfig) -> None:
    """`teacher.copy_attributes` are world attributes other than the edited one, with a teacher, and every
    reference prompt names them (a one-object caption)."""
    from pipeline.world import generator

    copied = config.teacher.copy_attributes
    if not config.teacher.weight:
        raise ValueError("teacher.copy_attributes needs a teacher (teacher.weight > 0)")
    if config.reference_text is not None:
        raise ValueError("teacher.copy_attributes needs the shapes-world captions (unset reference_text)")
    for attribute in copied:
        if attribute not in generator.EDITABLE_ATTRIBUTES or attribute == config.data.attribute:
            allowed = [name for name in generator.EDITABLE_ATTRIBUTES if name != config.data.attribute]
            raise ValueError(f"teacher.copy_attributes: {attribute!r} is not one of {allowed}")
    for prompt in dict.fromkeys(config.prompt_of_each_reference):
        parsed = generator.parse_caption(prompt)  # raises naming the prompt
        if len(parsed["objects"]) != 1:
            raise ValueError(f"reference prompt {prompt!r}: copy_attributes needs one-object captions")


def config_from_mapping(mapping: dict[str, Any]) -> ZipEncoderConfig:
    """The config from its JSON form (nested dataclasses rebuilt)."""
    fields = dct.task_fields(mapping)
    if "teacher" in fields:
        teacher = dict(fields["teacher"])
        teacher["copy_attributes"] = tuple(teacher.get("copy_attributes", ()))
        fields["teacher"] = TeacherConfig(**teacher)
    fields["reference_prompts"] = tuple(fields.get("reference_prompts", ()))
    fields["given_references"] = tuple(
        GivenReference(**reference) for reference in fields.get("given_references", ())
    )
    return ZipEncoderConfig(**fields)


def mid_block_channels(unet: torch.nn.Module) -> int:
    """C of h-space: the channels of the UNet's deepest block."""
    return int(unet.config.block_out_channels[-1])


def render_references(model, prompt: str, seeds: list[int], steps: int, guidance: float) -> torch.Tensor:
    """Reference images of the Visual Generator: the base model samples `prompt` from seeded noise.

    Args:
        model: the base DiffusionModel.
        prompt: t_target.
        seeds: one reference per seed (its starting noise is drawn on the CPU from it).
        steps: DDIM steps.
        guidance: classifier-free guidance w.

    Returns:
        (R, H, W, 3) uint8 images on the CPU.
    """
    from pipeline.diffusion.ddim import DDIMSchedule
    from pipeline.diffusion.sampling import sample
    from pipeline.diffusion.tokens import encode_prompts
    from pipeline.models.vae import decode_latents

    shape = (model.latent_channels, model.latent_size, model.latent_size)
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed)) for seed in seeds])
    schedule = DDIMSchedule.from_scheduler(model.scheduler, steps)
    cond = encode_prompts(model.tokenizer, model.text_encoder, [prompt]).expand(len(seeds), -1, -1)
    uncond = encode_prompts(model.tokenizer, model.text_encoder, [""]).expand(len(seeds), -1, -1)
    per_step = (schedule.num_steps, *cond.shape)
    latents, _ = sample(
        model.unet,
        schedule,
        noise.to(model.device),
        cond.unsqueeze(0).expand(per_step),
        uncond.unsqueeze(0).expand(per_step),
        guidance,
    )
    return decode_latents(model, latents)


def reference_codes_of(model, images: torch.Tensor) -> torch.Tensor:
    """r of each reference image: mean over space of the frozen UNet's h at the image's clean latent.

    Args:
        model: the base DiffusionModel.
        images: (R, H, W, 3) uint8 at the model's resolution.

    Returns:
        (R, C) float32 reference codes.
    """
    from pipeline.diffusion.tokens import encode_prompts
    from pipeline.models.vae import encode_images

    latents = encode_images(model, images)
    uncond = encode_prompts(model.tokenizer, model.text_encoder, [""]).expand(len(images), -1, -1)
    with torch.no_grad(), za.captured_mid_features(model.unet) as captured:
        fixed_branch_noise(model.unet, latents, 0, uncond)
    return za.reference_codes(captured[0].float())


def styled_targets(targets: list[str], prompts: tuple[str, ...], copied: tuple[str, ...]) -> list[list[str]]:
    """Each image's y_tar once per reference prompt, with the `copied` attributes set to the prompt's.

    Args:
        targets: one-object captions with the edited attribute already changed, (N,).
        prompts: the reference prompts, (P,), one-object captions when `copied` is not empty.
        copied: attribute names (shapes-world grammar); empty = the targets unchanged, P = 1.

    Returns:
        P lists of N captions (one list when nothing is copied).
    """
    if not copied:
        return [list(targets)]
    from pipeline.world import generator

    target_fields = [generator.one_object_fields(target) for target in targets]
    styled = []
    for prompt in prompts:
        style = {attribute: generator.one_object_fields(prompt)[attribute] for attribute in copied}
        styled.append([generator.one_object_caption(**(fields | style)) for fields in target_fields])
    return styled


def teacher_groups(config: ZipEncoderConfig) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The teacher's groups: one per distinct value of `teacher.copy_attributes` among the references'
    prompts, or a single group when nothing is copied.

    Returns:
        a prompt showing each group (the first reference's of it), (G,), and each reference's group, (R,).
    """
    prompts = config.prompt_of_each_reference
    copied = config.teacher.copy_attributes
    if not copied:
        return prompts[:1], (0,) * len(prompts)
    from pipeline.world import generator

    keys: list[tuple[str, ...]] = []
    shown, groups = [], []
    for prompt in prompts:
        fields = generator.one_object_fields(prompt)
        key = tuple(fields[attribute] for attribute in copied)
        if key not in keys:
            keys.append(key)
            shown.append(prompt)
        groups.append(keys.index(key))
    return tuple(shown), tuple(groups)


def teacher_edits(
    model, images: np.ndarray, references: list[str], targets: list[str], teacher: TeacherConfig
) -> torch.Tensor:
    """The frozen model's word-swap edits of the training images, L_teacher's targets.

    Args:
        model: the base DiffusionModel.
        images: uint8 (N, H, W, 3) at the model's resolution.
        references: each image's caption (y_ref), the prompt it is inverted with.
        targets: each image's y_tar, the prompt it is edited to.
        teacher: the inversion method, steps, guidance and Prompt-to-Prompt fractions.

    Returns:
        (N, 3, H, W) float32 in [-1, 1], on the CPU.

    Raises:
        ValueError: naming the first image the engine could not edit and why.
    """
    from pipeline.engine import AttentionControl, EditRequest, InversionConfig, edit, invert

    config = InversionConfig.of(teacher.inversion, num_steps=teacher.steps, guidance_scale=teacher.guidance)
    control = AttentionControl(
        "replace", cross_replace_steps=teacher.cross_replace, self_replace_steps=teacher.self_replace
    )
    edited = []
    for first in range(0, len(images), 16):
        rows = slice(first, first + 16)
        inversion = invert(model, torch.as_tensor(images[rows]), references[rows], config)
        requests = [EditRequest(index, target, control) for index, target in enumerate(targets[rows])]
        for offset, result in enumerate(edit(model, inversion, requests)):
            if result.error is not None:
                raise ValueError(
                    f"teacher: training image {first + offset} ({references[first + offset]!r}) "
                    f"could not be edited: {result.error}"
                )
            edited.append(torch.as_tensor(result.image))
    return torch.stack(edited).permute(0, 3, 1, 2).float() / 127.5 - 1.0


class ZipEncoderTask:
    """The TrainTask of one ZIP attribute encoder (see the module docstring)."""

    kind = KIND

    def __init__(self, config: ZipEncoderConfig) -> None:
        self.config = config

    def setup(self, device: torch.device, rank: int, world_size: int) -> None:
        config = self.config
        dct.load_task_models(self, device, rank, world_size, frozen=True)
        self.clips = dct.load_clips(config, device, self.clip)
        from pipeline.editors import read_reference_image  # editors imports this module

        seeds = list(range(config.reference_seed, config.reference_seed + config.references))
        rendered = [
            render_references(self.model, prompt, seeds, config.reference_steps, config.reference_guidance)
            for prompt in config.prompts
        ]
        given = [
            read_reference_image(reference.image, self.model.image_size)[None]
            for reference in config.given_references
        ]
        self.reference_images = torch.cat(rendered + given)
        self.codes = reference_codes_of(self.model, self.reference_images)
        self._prepare_pairs()
        self.prior = None
        if config.prior.weight:  # the model is frozen: the prior reads its own UNet
            self.prior = dct.prior_draws(self, self.model.unet)
        torch.manual_seed(config.seed)
        self.head = za.AttributeHead(mid_block_channels(self.model.unet), config.hidden).to(device)
        if config.reference_norm == "standardise":
            self.head.standardise_codes(self.codes)
        self.optimizer = torch.optim.Adam(self.head.parameters(), lr=config.lr)
        self.grid = dc.ReturnGrid.from_scheduler(
            self.model.scheduler, config.return_step, config.generative_steps
        )
        self.loss_weights = za.LossWeights(clip=config.clip_weight, recon=config.recon_weight)

    def _prepare_pairs(self) -> None:
        """x_t0 of every training image (eq. 12 with S_for steps) and its ΔT by every CLIP, (K, N, D)."""
        from pipeline.diffusion.tokens import encode_prompts
        from pipeline.models.vae import encode_images

        config, model = self.config, self.model
        images, self.text_directions = dct.ensemble_images_and_directions(config, self.clips)
        self.embed = dct.ensemble_image_embed(self.clips)
        images = dct._at_resolution(images, model.image_size)
        self.condition = encode_prompts(model.tokenizer, model.text_encoder, [config.prompt])
        forward_grid = dc.ReturnGrid.from_scheduler(model.scheduler, config.return_step, config.forward_steps)
        latents = encode_images(model, torch.as_tensor(images))
        self.source_latents = latents
        noise_fn = self._noise_fn(fixed_branch_noise)
        self.start_latents = torch.cat(
            [dc.forward(noise_fn, forward_grid, chunk) for chunk in latents.split(16)]
        )
        self.teacher_images = None  # (G, N, 3, H, W): per `teacher_groups` group
        if config.teacher.weight:
            _, _, references, targets = dct.training_texts(config)
            shown, groups = teacher_groups(config)
            self.teacher_groups = torch.as_tensor(groups)
            styled = styled_targets(targets, shown, config.teacher.copy_attributes)
            self.teacher_images = torch.stack(
                [teacher_edits(model, images, references, group, config.teacher) for group in styled]
            ).to(self.start_latents.device)

    def _noise_fn(self, branch) -> za.NoiseFn:
        def noise(latents: torch.Tensor, timestep: int) -> torch.Tensor:
            return branch(self.model.unet, latents, timestep, self.condition.expand(latents.shape[0], -1, -1))

        return noise

    def _paired_noise_fn(self, codes: torch.Tensor) -> za.PairedNoiseFn:
        return za.paired_noise(
            self._noise_fn(optimised_branch_noise),
            self.model.unet,
            lambda features: self.head(features, codes),
        )

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        return dct.differentiable_decode(self.model.vae, latents)

    def draw(self, iteration: int) -> tuple[np.ndarray, np.ndarray]:
        """This worker's (image rows, reference rows) of iteration `iteration` (fixed by (seed, iteration))."""
        generator = np.random.default_rng([self.config.seed, iteration])
        rows = generator.choice(len(self.start_latents), size=self.config.batch, replace=False)
        references = generator.integers(0, len(self.codes), size=self.config.batch)
        share = slice(self.rank, None, self.world_size)
        return rows[share], references[share]

    def step(self, iteration: int, sync) -> dict[str, float]:
        rows, references = (torch.as_tensor(part) for part in self.draw(iteration))
        if self.config.variant == "full_backprop":
            return self._full_pass_step(iteration, rows, references, sync)
        losses = za.training_losses(
            self._paired_noise_fn(self.codes[references]),
            self.grid,
            self.start_latents[rows],
            self.config.zip_step,
            self._decode,
            self.embed,
            self.text_directions[:, rows].flatten(0, 1),
            self.loss_weights,
        )
        levels = int((self.grid.timesteps[1:] > self.config.zip_step).sum())
        self.optimizer.zero_grad()
        totals: dict[str, float] = {}
        for loss, terms in losses:
            (loss / levels).backward()  # gradients of all levels accumulate; one step per pass
            for name, value in {"loss": loss.detach(), **terms}.items():
                totals[name] = totals.get(name, 0.0) + float(value) / levels
        sync()
        self.optimizer.step()
        return totals

    def _full_pass_step(
        self, iteration: int, rows: torch.Tensor, references: torch.Tensor, sync
    ) -> dict[str, float]:
        # Each row's reference code, for both halves of the pass (only the Δh half reads it).
        codes = self.codes[references].repeat(2, 1)
        loss, terms = za.full_pass_loss(
            self._paired_noise_fn(codes),
            self._noise_fn(optimised_branch_noise),
            self.grid,
            self.start_latents[rows],
            self.config.zip_step,
            self._decode,
            self.embed,
            self.text_directions[:, rows].flatten(0, 1),
            self.loss_weights,
            prior=None if self.prior is None else self.prior.term(iteration, rows),
            teacher=self._teacher_term(rows, references),
        )
        self.optimizer.zero_grad()
        loss.backward()
        sync()
        self.optimizer.step()
        return {"loss": float(loss.detach()), **{name: float(value) for name, value in terms.items()}}

    def _teacher_term(self, rows: torch.Tensor, references: torch.Tensor) -> za.TeacherTerm | None:
        if self.teacher_images is None:
            return None
        groups = self.teacher_groups[references]
        return za.TeacherTerm(self.teacher_images[groups, rows], self.config.teacher.weight)

    def trained_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.head.parameters())

    def state_dict(self) -> dict[str, Any]:
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])

    def artefact(self) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
        weights = {
            f"{HEAD_PREFIX}{name}": tensor.detach().clone() for name, tensor in self.head.state_dict().items()
        }
        weights[REFERENCES_NAME] = self.reference_images.clone()
        config = dataclasses.asdict(self.config) | {
            "channels": self.head.channels,
            "hidden_resolved": self.head.hidden,
        }
        return weights, config, self.base_fingerprint


def build_task(mapping: dict[str, Any]) -> ZipEncoderTask:
    """The factory `ray_train` calls on every worker."""
    return ZipEncoderTask(config_from_mapping(mapping))


def load_head(weights: dict[str, torch.Tensor], config: dict[str, Any]) -> za.AttributeHead:
    """The trained AttributeHead of an artefact's weights and config."""
    head = za.AttributeHead(config["channels"], config["hidden_resolved"])
    trained = {
        name.removeprefix(HEAD_PREFIX): tensor
        for name, tensor in weights.items()
        if name.startswith(HEAD_PREFIX)
    }
    # Artefacts written before r could be standardised hold no code mean and scale: theirs is the identity.
    head.load_state_dict(head.state_dict() | trained)
    return head.eval().requires_grad_(False)
