"""The job spec: a YAML file parsed once into typed, frozen dataclasses.

Public key paths (docs and scripts rely on them): `input.shards`, `model.path`, `inversion.method`,
`edits` (a list), `output.path`. Any key can be overridden with `--set dotted.key=value`; the value is
parsed as YAML (`--set inversion.num_steps=10`, `--set edits.0.seeds=[1,2]`).

Unknown keys and wrong types raise `ConfigError` naming the file and the dotted key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.diffusion.control import AttentionControl
from pipeline.methods import InversionConfig, UnknownMethodError, get_method
from pipeline.methods.editor_windows import ALL_STEPS, Combination, check_weights


class ConfigError(ValueError):
    """A job spec that cannot be used; the message names the file, the key and the fix."""


# A float literal with an exponent and no dot (`2e-4`, `-1E+3`): a float in YAML 1.2, a string to PyYAML.
YAML_1_2_FLOAT = re.compile(r"[-+]?[0-9]+[eE][-+]?[0-9]+")


@dataclass(frozen=True)
class InputFields:
    """Which members of a WebDataset sample hold what.

    Attributes:
        image: extensions tried in order for the image member (jpg, jpeg, png, webp are decoded).
        caption: extension of the caption member (UTF-8 text); it is the source prompt.
        class_: extension of the class member, or `EXT.KEY` to read KEY from a JSON member
            (e.g. `json.class`). In YAML the key is `class`.
        meta: extension of an optional JSON member whose keys fill `{placeholders}` of prompt templates.
    """

    image: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
    caption: str = "txt"
    class_: str = "cls"
    meta: str | None = "json"


@dataclass(frozen=True)
class ReadRetry:
    """How often a shard that cannot be read whole (missing, unreadable, truncated, a transient store
    error) is read again before the job records it as failed.

    Attributes:
        attempts: reads of a shard in all (1 = no retry).
        backoff_seconds: wait before the second read; doubled before each later one.
        max_backoff_seconds: cap on one wait.
    """

    attempts: int = 3
    backoff_seconds: float = 1.0
    max_backoff_seconds: float = 30.0


@dataclass(frozen=True)
class InputConfig:
    """Attributes:
    shards: fsspec URLs (file://, s3://, gs://, local paths); brace ranges `{000000..000127}` expand,
        and a name with * ? or [ is globbed.
    fields: sample member names.
    retry: re-reads of a shard that fails as a whole (it changes no row, so it is not in the digest).
    """

    shards: tuple[str, ...]
    fields: InputFields = field(default_factory=InputFields)
    retry: ReadRetry = field(default_factory=ReadRetry)


@dataclass(frozen=True)
class ModelConfig:
    """Attributes:
    path: diffusers folder or hub id.
    device: auto (cuda when the actor has a GPU) | cpu | cuda.
    dtype: float32 | float16 | bfloat16 (inversion optimises in float32; keep float32 unless sampling).
    precision: fp32 (IEEE float32 throughout) | tf32 (float32 on TF32 matrix units) | mixed (tf32, and
        bf16 autocast for the UNet calls no gradient flows through) | bf16 (mixed, and the optimised
        branch under bf16 autocast with float32 embeddings and optimiser); see pipeline/diffusion/precision.py.
    image_size: pixels per side the images are resized/cropped to; null = read from the model's
        unet/vae configs (set it when the driver cannot read model.path, e.g. a path on GPU nodes only).
    """

    path: str
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    precision: Literal["fp32", "tf32", "mixed", "bf16"] = "fp32"
    image_size: int | None = None


@dataclass(frozen=True)
class PromptSpec:
    """How the target prompt is built from a sample.

    Attributes:
        mode: swap: replace the source word by the target word in the caption (whole words);
            template: format `template`.
        template: used when mode is template; placeholders {source}, {target}, {caption} and any key of
            the sample's meta JSON, e.g. "a {color} {target} on a {background} background".
        source_word: word replaced by swap; default the source class.
        target_word: word inserted; default the target class.
    """

    mode: Literal["swap", "template"] = "swap"
    template: str | None = None
    source_word: str | None = None
    target_word: str | None = None


@dataclass(frozen=True)
class EditorRef:
    """A trained editor that an edit applies (an artefact written by `inversa train`): a DiffusionCLIP
    editor (kind diffusion_clip) or a ZIP attribute encoder (kind zip_encoder, which edits alone).

    Attributes:
        uri: the artefact folder (local path, file://, s3://, gs://).
        gamma: a DiffusionCLIP editor's weight in the noise combination sum_i gamma_i eps_i (eq. 14; the
            weights lie in [0, 1] and sum to at most 1, the base model getting 1 - sum, so below 1 a
            single editor gives the continuous transition); a ZIP encoder's scale of Δh in [0, 1].
        reference: a ZIP encoder's reference image (path or URI of a PNG/JPEG, resized to the model's
            resolution); None = the reference the encoder rendered when it was trained.
        window: a DiffusionCLIP editor's timesteps [low, high] (inclusive, of the scheduler's 1000) in
            which its gamma applies, 0 outside: eq. 14's gamma_i(t) piecewise constant, as the reference
            code's hybrid_config sets it (e.g. a shape editor on [250, 999], a colour editor on [0, 249]);
            None = every step.
    """

    uri: str
    gamma: float = 1.0
    reference: str | None = None
    window: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.window is not None and (len(self.window) != 2 or not 0 <= self.window[0] <= self.window[1]):
            raise ValueError(
                f"editor {self.uri}: window {list(self.window)} must be two timesteps, low then high, with 0 <= low <= high"
            )

    def to_mapping(self) -> dict[str, Any]:
        mapping = {"uri": self.uri, "gamma": self.gamma}
        # Editors without a reference or window keep the ids they had before.
        if self.reference is not None:
            mapping["reference"] = self.reference
        if self.window is not None:
            mapping["window"] = list(self.window)
        return mapping


@dataclass(frozen=True)
class EditSpec:
    """One entry of the edit plan.

    Attributes:
        target_class: class the edit produces (the edits table's partition).
        source_classes: classes this edit applies to; empty = every class except the target.
        name: label recorded in params (default: target_class).
        prompt: how the target prompt is built.
        control: Prompt-to-Prompt / P2Plus attention control (engine AttentionControl); the words
            "{source}" and "{target}" in blend_words and reweight are replaced by the prompt's words.
        seeds: one edit per seed (sample_index = position in this list).
        eta: prompt tuning's interpolation weight.
        latent_interpolation: prompt tuning's eq. 10 variant.
        samples: K stochastic samples per seed (needs `stochastic`); sample k of seed s draws its
            embeddings with sample_seed = s * K + k and has sample_index = (position of s) * K + k.
        stochastic: null (deterministic edits), null_text_vae (sampled null-text embeddings; needs
            inversion.method null_text_vae) or cond_vae (sampled conditional embeddings C''; needs `vae`,
            any inversion method).
        vae: URI of the conditional-embedding VAE artefact of `stochastic: cond_vae`
            (`inversa train`, kind cond_vae).
        temperature: the sampling temperature (scales the VAE's sigma; 0 = the mean decode).
        editors: trained editors; when given, the edit is theirs (the source goes forward to the
            editors' return step with the base model and comes back with the weighted DiffusionCLIP
            editors, or with a ZIP encoder's Δh), not a Prompt-to-Prompt edit of the inversion; the
            prompt still names the target for scoring.
        combination: how DiffusionCLIP editors' noises combine: convex (eq. 14: gammas in [0, 1]
            summing to at most 1, the base model taking the rest) or conjunction (each editor's change
            from the base model added with its gamma >= 0, eps + sum_i gamma_i (eps_i - eps), so two
            editors at gamma 1 each apply in full; for editors that each move only their own attribute).
    """

    target_class: str
    source_classes: tuple[str, ...] = ()
    name: str | None = None
    prompt: PromptSpec = field(default_factory=PromptSpec)
    control: AttentionControl = field(default_factory=AttentionControl)
    seeds: tuple[int, ...] = (0,)
    eta: float = 0.9
    latent_interpolation: bool = False
    samples: int = 1
    stochastic: Literal["null_text_vae", "cond_vae"] | None = None
    temperature: float = 1.0
    vae: str | None = None
    editors: tuple[EditorRef, ...] = ()
    combination: Combination = "convex"

    def __post_init__(self) -> None:
        if not self.editors:
            if self.combination != "convex":
                raise ValueError("combination applies to editors: give editors or leave combination out")
            return
        check_weights(
            [editor.gamma for editor in self.editors],
            [editor.window or ALL_STEPS for editor in self.editors],
            self.combination,
        )
        if self.stochastic is not None or self.samples != 1 or len(self.seeds) != 1:
            raise ValueError(
                "an edit with editors is deterministic: leave out stochastic and samples and give one seed"
            )

    # Keys that a deterministic edit leaves out of its mapping, so its edit ids and spec digest stay as
    # they were before stochastic edits existed.
    STOCHASTIC_KEYS = ("samples", "stochastic", "temperature")

    def to_mapping(self) -> dict[str, Any]:
        mapping = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if self.stochastic is None and self.samples == 1:
            for key in self.STOCHASTIC_KEYS:
                mapping.pop(key)
        if not self.editors:  # edits without editors keep the ids and digests they had before editors
            mapping.pop("editors")
        if self.combination == "convex":  # likewise edits from before the conjunction
            mapping.pop("combination")
        if self.vae is None:  # likewise edits without a conditional-embedding VAE
            mapping.pop("vae")
        return mapping

    def sample_seeds(self) -> list[tuple[int, int, int | None]]:
        """(seed, sample_index, sample_seed) of every edit of this spec; sample_seed None when deterministic."""
        if self.stochastic is None:
            return [(seed, index, None) for index, seed in enumerate(self.seeds)]
        return [
            (seed, position * self.samples + k, seed * self.samples + k)
            for position, seed in enumerate(self.seeds)
            for k in range(self.samples)
        ]


@dataclass(frozen=True)
class ClipMetricConfig:
    """Attributes:
    model_name: open_clip model name (e.g. ViT-B-32).
    pretrained: open_clip pretrained tag or checkpoint path; null = random weights (tests only).
    config_file: optional open_clip model config JSON (file stem = model_name) registered before loading.
    """

    model_name: str = "ViT-B-32"
    pretrained: str | None = "laion2b_s34b_b79k"
    config_file: str | None = None


@dataclass(frozen=True)
class MetricsConfig:
    """Attributes:
    clip: open_clip model for CLIP-T, CLIP-I and directional CLIP.
    perceptual: backbone of pipeline.metrics.build_perceptual: lpips-alex | lpips-vgg | lpips-squeeze |
        features:NAME (then feature_extractor is required).
    feature_extractor: for features:NAME, "package.module:factory" or "/path/file.py:factory"; the
        factory (no arguments) returns a module with features(images (B,3,H,W) in [0,1]) -> list of maps.
    classifier: optional "package.module:factory" or "/path/file.py:factory"; the factory (no
        arguments) returns a callable mapping images (B, 3, H, W) in [0, 1] to B class names. Each
        edit's class as this classifier reads it is recorded in `classified_as` (e.g. a classifier of
        the rare classes checks that an edit really shows its target class).
    device: auto | cpu | cuda.
    """

    clip: ClipMetricConfig = field(default_factory=ClipMetricConfig)
    perceptual: str = "lpips-alex"
    feature_extractor: str | None = None
    classifier: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass(frozen=True)
class FilterConfig:
    """Thresholds; an edit passes when every threshold that is set holds (null = not checked).

    require_target_class: the edit passes only when metrics.classifier reads it as its target class.
    """

    min_clip_t: float | None = None
    min_clip_dir: float | None = None
    min_clip_i: float | None = None
    max_lpips: float | None = None
    min_bg_psnr: float | None = None
    max_bg_lpips: float | None = None
    min_bg_ssim: float | None = None
    min_clip_t_edited: float | None = None
    max_structure_dist: float | None = None
    require_target_class: bool = False


@dataclass(frozen=True)
class StageResources:
    """Ray resources of one stage.

    Attributes:
        batch_size: rows per map_batches call.
        actors: actor pool size (ActorPoolStrategy min_size); ignored by task stages.
        max_actors: pool's max_size for autoscaling; null = fixed at `actors`.
        num_gpus: GPUs per task/actor (fractions share a GPU).
        num_cpus: CPUs per task/actor.
    """

    batch_size: int = 8
    actors: int = 1
    max_actors: int | None = None
    num_gpus: float = 0.0
    num_cpus: float = 0.5


@dataclass(frozen=True)
class ResourcesConfig:
    """Per-stage resources: read (tasks), preprocess (tasks), invert_edit (actors), score (actors),
    write (tasks). edit_batch_size caps the edit requests sent to the engine in one call."""

    read: StageResources = field(default_factory=StageResources)
    preprocess: StageResources = field(default_factory=lambda: StageResources(batch_size=32))
    invert_edit: StageResources = field(default_factory=StageResources)
    score: StageResources = field(default_factory=lambda: StageResources(batch_size=16))
    write: StageResources = field(default_factory=lambda: StageResources(batch_size=64))
    edit_batch_size: int = 16


@dataclass(frozen=True)
class OutputConfig:
    """Attributes:
    path: output URI (local folder, file://, s3://, gs://); gets edits/, sources/, errors/, manifest.json.
    composite: also write each edit composited into its source outside its edit mask (the local-blend /
        cross-attention mask), dilated by composite_dilation pixels and feathered over composite_feather
        pixels (`pipeline.diffusion.masks.composite`): the edits table's composite_image, scored as
        the composite_* metrics. Edits without a mask (has_mask false) are not composited.
    composite_dilation: pixels added around the edit mask at full weight (the mask comes from a grid
        8x coarser than the image, so its edges are blocky).
    composite_feather: width in pixels of the linear ramp from the edit to the source beyond that.
    """

    path: str
    composite: bool = False
    composite_dilation: int = 4
    composite_feather: int = 4

    def __post_init__(self) -> None:
        if self.composite_dilation < 0 or self.composite_feather < 0:
            raise ValueError(
                f"composite_dilation and composite_feather are pixel counts >= 0, got "
                f"{self.composite_dilation} and {self.composite_feather}"
            )


@dataclass(frozen=True)
class JobInversionConfig(InversionConfig):
    """The engine's inversion config, plus the prompt the job inverts each image with.

    In YAML the method's parameters sit beside the common keys (`inversion.inner_steps`); which keys
    are allowed depends on `inversion.method` (the registry in `pipeline.methods`).

    Attributes:
        prompt: source: the sample's caption; one inversion serves all of the image's edits.
            target: each edit's target prompt; one inversion per image and distinct target prompt.
            null: the method's default (prompt_tuning: target, as Prompt Tuning Inversion's
            Algorithm 1 inverts with the target prompt; the others: source).
        keep_artifacts: store every successful inversion (`pipeline.inversion_state`) under
            OUTPUT/artifacts/ and name the files in the sources table's `inversions` column, so images
            can be edited again without inverting them again. It changes what is written, not what is
            computed: edit ids do not depend on it.
    """

    prompt: Literal["source", "target"] | None = None
    keep_artifacts: bool = False

    @property
    def resolved_prompt(self) -> str:
        return self.prompt if self.prompt is not None else self.info.default_prompt

    def to_mapping(self) -> dict[str, Any]:
        mapping = super().to_mapping()
        mapping["prompt"] = self.resolved_prompt
        return mapping

    @classmethod
    def from_mapping(cls, data: Any, origin: str, key: str) -> JobInversionConfig:
        """Build from the YAML mapping, checking keys against the method's registered parameters."""
        if not isinstance(data, dict):
            raise _fail(origin, key, f"expected a mapping, got {type(data).__name__} {data!r}")
        method = data.get("method", cls.method)  # the dataclass default
        try:
            info = get_method(method)
        except UnknownMethodError as error:
            raise _fail(origin, f"{key}.method", str(error)) from None
        hints = typing.get_type_hints(cls)
        common = set(cls.common_keys())
        param_names = {f.name for f in dataclasses.fields(info.params)}
        unknown = sorted(set(data) - common - param_names)
        if unknown:
            raise _fail(
                origin,
                f"{key}.{unknown[0]}",
                f"unknown key for inversion.method {method!r}; allowed keys here are {sorted(common | param_names)}",
            )
        settings = {
            name: _convert(data[name], hints[name], origin, f"{key}.{name}") for name in common & set(data)
        }
        params = build_dataclass(
            info.params, {k: v for k, v in data.items() if k in param_names}, origin, key
        )
        # A spec's config is explicit: the method's defaults are written in, so the manifest and the
        # edit ids record exactly what ran.
        if settings.get("strength") is None:
            settings["strength"] = info.default_strength
        if settings.get("prompt") is None:
            settings["prompt"] = info.default_prompt
        try:
            return cls(params=params, **settings)
        except ValueError as error:  # __post_init__'s checks: encoder_fit_steps is the one it makes
            raise _fail(origin, f"{key}.encoder_fit_steps", str(error)) from None


@dataclass(frozen=True)
class JobConfig:
    """A whole job spec."""

    input: InputConfig
    model: ModelConfig
    edits: tuple[EditSpec, ...]
    output: OutputConfig
    name: str = "inversa-job"
    inversion: JobInversionConfig = field(default_factory=JobInversionConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)


# YAML keys that are Python keywords.
_YAML_KEY = {"class_": "class"}


def _yaml_key(name: str) -> str:
    return _YAML_KEY.get(name, name)


def _fail(origin: str, key: str, message: str) -> ConfigError:
    return ConfigError(f"{origin}: {key or '<root>'}: {message}")


def _convert(value: Any, hint: Any, origin: str, key: str) -> Any:
    """Check/convert one YAML value against a type hint."""
    origin_type = typing.get_origin(hint)
    if origin_type in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None:
            if type(None) in options:
                return None
            raise _fail(origin, key, "must not be null")
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _convert(value, option, origin, key)
            except ConfigError as error:
                errors.append(error)
        if len(errors) == 1:
            raise errors[0]
        raise _fail(origin, key, f"{value!r} matches none of {[getattr(o, '__name__', o) for o in options]}")
    if origin_type is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise _fail(origin, key, f"{value!r} is not one of {list(choices)}")
        return value
    if origin_type is tuple:
        args = typing.get_args(hint)
        if isinstance(value, str) and args[-1] is Ellipsis:
            value = [value]
        if not isinstance(value, list | tuple):
            raise _fail(origin, key, f"expected a list, got {type(value).__name__} {value!r}")
        if args[-1] is Ellipsis:
            return tuple(_convert(item, args[0], origin, f"{key}.{i}") for i, item in enumerate(value))
        if len(value) != len(args):
            raise _fail(origin, key, f"expected {len(args)} items, got {len(value)}")
        return tuple(
            _convert(item, arg, origin, f"{key}.{i}")
            for i, (item, arg) in enumerate(zip(value, args, strict=True))
        )
    if dataclasses.is_dataclass(hint):
        if hasattr(hint, "from_mapping"):
            return hint.from_mapping(value, origin, key)
        return build_dataclass(hint, value, origin, key)
    if hint is bool:
        if not isinstance(value, bool):
            raise _fail(origin, key, f"expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(origin, key, f"expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str) and YAML_1_2_FLOAT.fullmatch(value.strip()):
            # PyYAML resolves YAML 1.1, where `2e-4` (no dot) is a string; YAML 1.2 reads a float.
            return float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _fail(origin, key, f"expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise _fail(origin, key, f"expected a string, got {type(value).__name__} {value!r}")
        return value
    raise _fail(origin, key, f"unsupported type {hint}")


def build_dataclass(cls: type, data: Any, origin: str, key: str = "") -> Any:
    """Build the frozen dataclass `cls` from a YAML mapping, checking every key and type.

    Args:
        cls: the dataclass type.
        data: the mapping read from YAML.
        origin: file name used in error messages.
        key: dotted path of `data` inside the file.
    """
    if not isinstance(data, dict):
        raise _fail(origin, key, f"expected a mapping for {cls.__name__}, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields_by_key = {_yaml_key(f.name): f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields_by_key))
    if unknown:
        prefix = f"{key}." if key else ""
        raise _fail(
            origin, f"{prefix}{unknown[0]}", f"unknown key; allowed keys here are {sorted(fields_by_key)}"
        )
    kwargs = {}
    for yaml_key, dataclass_field in fields_by_key.items():
        child = f"{key}.{yaml_key}" if key else yaml_key
        hint = hints[dataclass_field.name]
        if yaml_key in data:
            kwargs[dataclass_field.name] = _convert(data[yaml_key], hint, origin, child)
        elif hasattr(hint, "from_mapping"):  # its defaults depend on the mapping: build them explicitly
            kwargs[dataclass_field.name] = hint.from_mapping({}, origin, child)
        elif (
            dataclass_field.default is dataclasses.MISSING
            and dataclass_field.default_factory is dataclasses.MISSING
        ):
            raise _fail(origin, child, "is required")
    try:
        return cls(**kwargs)
    except ValueError as error:  # a dataclass that checks its own values (a method's parameters)
        raise _fail(origin, key, str(error)) from None


def apply_override(data: dict, assignment: str) -> None:
    """Apply one `dotted.key=value` (value parsed as YAML) to the raw spec in place.

    List items are addressed by index: `edits.0.target_class=cat`.
    """
    if "=" not in assignment:
        raise ConfigError(
            f"--set {assignment!r}: expected dotted.key=value, e.g. --set inversion.num_steps=10"
        )
    dotted, raw_value = assignment.split("=", 1)
    parts = dotted.strip().split(".")
    value = yaml.safe_load(raw_value) if raw_value.strip() else ""
    node: Any = data
    for depth, part in enumerate(parts[:-1]):
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--set {dotted}: {where} must be an index below {len(node)}")
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
        if not isinstance(node, dict | list):
            raise ConfigError(f"--set {dotted}: {where} holds {node!r}, not a mapping")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"--set {dotted}: last part must be an index below {len(node)}")
        node[int(last)] = value
    else:
        node[last] = value


def load_raw(path: str | Path) -> dict:
    """The YAML mapping of a job file, or of the environment variable NAME for `env:NAME`
    (how `inversa submit` hands the resolved spec to the cluster)."""
    if str(path).startswith("env:"):
        name = str(path)[4:]
        if name not in os.environ:
            raise ConfigError(f"job spec {path}: environment variable {name} is not set")
        text = os.environ[name]
    else:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"job spec {path} does not exist")
        text = path.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the job spec must be a YAML mapping with keys input, model, edits, output"
        )
    return data


def parse_config(data: dict, origin: str = "<job spec>") -> JobConfig:
    """Build and check a JobConfig from a raw mapping."""
    config = build_dataclass(JobConfig, data, origin)
    _check(config, origin)
    return config


def load_config(
    path: str | Path, overrides: typing.Sequence[str] = (), output: str | None = None
) -> JobConfig:
    """Read a job YAML, apply `--set` overrides and an optional output override, and check it."""
    data = load_raw(path)
    for assignment in overrides:
        apply_override(data, assignment)
    if output is not None:
        data.setdefault("output", {})["path"] = output
    return parse_config(data, str(path))


def _check(config: JobConfig, origin: str) -> None:
    """Checks that span several keys."""
    if not config.input.shards:
        raise _fail(origin, "input.shards", "needs at least one shard URL")
    if not config.edits:
        raise _fail(origin, "edits", "needs at least one edit")
    for index, edit in enumerate(config.edits):
        if edit.prompt.mode == "template" and not edit.prompt.template:
            raise _fail(origin, f"edits.{index}.prompt.template", "is required when prompt.mode is template")
        if not edit.seeds:
            raise _fail(origin, f"edits.{index}.seeds", "needs at least one seed")
        if len(set(edit.seeds)) != len(edit.seeds):
            raise _fail(origin, f"edits.{index}.seeds", f"{list(edit.seeds)} repeats a seed")
        _check_samples(edit, config.inversion, origin, f"edits.{index}")
        if edit in config.edits[:index]:
            raise _fail(
                origin,
                f"edits.{index}",
                "repeats an earlier edit exactly; it would produce the same edit_ids",
            )
    if config.metrics.perceptual.startswith("features:") != (config.metrics.feature_extractor is not None):
        raise _fail(
            origin,
            "metrics.feature_extractor",
            "is required for (and only for) a features:NAME perceptual backbone",
        )
    if config.filter.require_target_class and config.metrics.classifier is None:
        raise _fail(
            origin,
            "filter.require_target_class",
            "needs metrics.classifier (a 'package.module:factory' returning the classifier that reads "
            "each edit's class); set one or drop the filter",
        )
    for name in (f.name for f in dataclasses.fields(config.resources)):
        stage = getattr(config.resources, name)
        if not isinstance(stage, StageResources):
            continue
        if stage.batch_size < 1 or stage.actors < 1:
            raise _fail(origin, f"resources.{name}", "batch_size and actors must be >= 1")
        if stage.max_actors is not None and stage.max_actors < stage.actors:
            raise _fail(origin, f"resources.{name}.max_actors", "must be >= actors")
    retry = config.input.retry
    if retry.attempts < 1 or retry.backoff_seconds < 0 or retry.max_backoff_seconds < 0:
        raise _fail(origin, "input.retry", "attempts must be >= 1 and the backoff seconds >= 0")


def _check_samples(edit: EditSpec, inversion: InversionConfig, origin: str, key: str) -> None:
    if edit.samples < 1:
        raise _fail(origin, f"{key}.samples", f"{edit.samples} must be >= 1")
    if edit.samples > 1 and edit.stochastic is None:
        raise _fail(
            origin,
            f"{key}.samples",
            "K > 1 samples need stochastic: null_text_vae or cond_vae (deterministic samples would all be equal)",
        )
    if (edit.stochastic == "cond_vae") != (edit.vae is not None):
        raise _fail(
            origin,
            f"{key}.vae",
            "stochastic: cond_vae samples from a trained VAE: give vae (its artefact URI) with it, and only with it",
        )
    if edit.stochastic == "null_text_vae" and inversion.method != edit.stochastic:
        raise _fail(
            origin,
            f"{key}.stochastic",
            f"{edit.stochastic} samples need inversion.method: {edit.stochastic} "
            f"(it is {inversion.method!r})",
        )
    if not edit.temperature >= 0:
        raise _fail(origin, f"{key}.temperature", f"{edit.temperature} must be >= 0")


def to_dict(config: Any) -> Any:
    """A JSON-ready mapping of a config (YAML key names), for the manifest."""
    if hasattr(config, "to_mapping"):
        return {name: to_dict(value) for name, value in config.to_mapping().items()}
    if dataclasses.is_dataclass(config):
        return {_yaml_key(f.name): to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, tuple | list):
        return [to_dict(item) for item in config]
    return config


LATER_FILTER_KEYS = ("min_bg_ssim", "min_clip_t_edited", "max_structure_dist")


def spec_digest(config: JobConfig) -> str:
    """sha256 of everything that changes the rows produced (output path excluded)."""
    data = to_dict(config)
    output = data.pop("output")
    if output["composite"]:  # compositing adds to the rows; without it digests stay as they were
        data["composite"] = {key: value for key, value in output.items() if key != "path"}
    data.pop("resources")
    data.pop("name")
    data["input"].pop("retry")
    # Keys added since outputs were first written count only when set, so those outputs still resume.
    for key in LATER_FILTER_KEYS:
        if data["filter"].get(key) is None:
            data["filter"].pop(key, None)
    if not data["inversion"].get("keep_artifacts"):
        data["inversion"].pop("keep_artifacts", None)
    if not data["inversion"].get("encoder_fit_steps"):
        data["inversion"].pop("encoder_fit_steps", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
