"""The edit plan of one source sample: which edits apply, their prompts, seeds and edit_ids.

Pure functions (no Ray, no files); the invert/edit actor calls `plan_edits` per sample.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import string
from dataclasses import dataclass

from pipeline.config import EditorRef, EditSpec, to_dict
from pipeline.diffusion.control import AttentionControl
from pipeline.methods import InversionConfig
from pipeline.stages.rows import Failure


class PlanError(ValueError):
    """An edit that cannot be planned for a sample (e.g. the caption lacks the word to swap)."""


@dataclass(frozen=True)
class PlannedEdit:
    """One edit of one source, ready for the engine.

    Attributes:
        edit_id: deterministic id (see `make_edit_id`).
        target_class: the edit's class.
        target_prompt: prompt the image is edited with.
        seed: the edit's seed.
        sample_index: position of the seed in the spec's seeds.
        control: attention control with {source}/{target} words filled in.
        eta: prompt tuning's eta.
        latent_interpolation: prompt tuning's eq. 10 variant.
        params: JSON string recorded in the edits table.
        sample_seed: the seed of a stochastic sample's embeddings; None for a deterministic edit.
        sample_temperature: the stochastic sample's temperature; None for a deterministic edit.
        sample_group: id shared by all samples of one edit spec of one source (None when deterministic).
        editors: the trained editors that make this edit (empty: a Prompt-to-Prompt edit of the inversion).
        editor_combination: how the editors' noises combine ("convex" or "conjunction", `EditSpec`).
        embedding_vae: URI of the conditional-embedding VAE that samples this edit's C'' (cond_vae), or None.
    """

    edit_id: str
    target_class: str
    target_prompt: str
    seed: int
    sample_index: int
    control: AttentionControl
    eta: float
    latent_interpolation: bool
    params: str
    sample_seed: int | None = None
    sample_temperature: float | None = None
    sample_group: str | None = None
    editors: tuple[EditorRef, ...] = ()
    editor_combination: str = "convex"
    embedding_vae: str | None = None


def applies_to(spec: EditSpec, source_class: str | None) -> bool:
    """Whether `spec` edits a sample of `source_class` (never a class into itself)."""
    if source_class is None or source_class == spec.target_class:
        return False
    return not spec.source_classes or source_class in spec.source_classes


def target_prompt(spec: EditSpec, caption: str, source_class: str, meta: dict) -> tuple[str, str, str]:
    """Build the target prompt.

    Returns:
        (prompt, source_word, target_word).

    Raises:
        PlanError: the caption lacks the word to swap, or a template placeholder has no value.
    """
    source_word = spec.prompt.source_word or source_class
    target_word = spec.prompt.target_word or spec.target_class
    if spec.prompt.mode == "swap":
        pattern = re.compile(rf"\b{re.escape(source_word)}\b", flags=re.IGNORECASE)
        if not pattern.search(caption):
            raise PlanError(
                f"caption {caption!r} has no word {source_word!r} to swap for {target_word!r}; "
                "set prompt.source_word or use prompt.mode: template"
            )
        return pattern.sub(target_word, caption), source_word, target_word
    values = {**meta, "source": source_word, "target": target_word, "caption": caption}
    names = {name for _, name, _, _ in string.Formatter().parse(spec.prompt.template) if name}
    missing = sorted(names - set(values))
    if missing:
        raise PlanError(
            f"template {spec.prompt.template!r} needs {missing}, which the sample's meta does not hold"
        )
    return spec.prompt.template.format(**values), source_word, target_word


def fill_control(control: AttentionControl, source_word: str, target_word: str) -> AttentionControl:
    """Replace the words "{source}" / "{target}" in every word list of the control."""

    def fill(word: str) -> str:
        return word.replace("{source}", source_word).replace("{target}", target_word)

    return dataclasses.replace(
        control,
        blend_words=tuple(fill(word) for word in control.blend_words),
        blend_exclude_words=tuple(fill(word) for word in control.blend_exclude_words),
        reweight=tuple((fill(word), scale) for word, scale in control.reweight),
        cross_replace_words=tuple((fill(word), bounds) for word, bounds in control.cross_replace_words),
    )


def make_edit_id(
    source_id: str,
    spec: EditSpec,
    inversion: InversionConfig,
    prompt: str,
    seed: int | None,
    sample_seed: int | None = None,
) -> str:
    """sha256 (first 32 hex digits) of source_id, the canonical edit spec, inversion config, prompt, seed
    and (for a stochastic sample only, so deterministic ids are unchanged) the sample seed."""
    # keep_artifacts changes what is written, not what is computed: it must not change the ids. An
    # encoder_fit_steps of 0 is left out so that ids from before the setting existed stay the same.
    inversion_record = {
        key: value
        for key, value in to_dict(inversion).items()
        if key != "keep_artifacts" and not (key == "encoder_fit_steps" and value == 0)
    }
    record = {
        "source_id": source_id,
        "spec": to_dict(spec),
        "inversion": inversion_record,
        "prompt": prompt,
        "seed": seed,
    }
    if sample_seed is not None:
        record["sample_seed"] = sample_seed
    canonical = json.dumps(record, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def plan_edits(
    source_id: str,
    source_class: str | None,
    caption: str,
    meta: dict,
    specs: tuple[EditSpec, ...],
    inversion: InversionConfig,
    backbones: dict[str, str],
) -> tuple[list[PlannedEdit], list[Failure]]:
    """All edits of one sample.

    Returns:
        (planned edits, one "plan" failure (edit_id None) per spec that applies but cannot be planned).
    """
    planned, failures = [], []
    for spec in specs:
        if not applies_to(spec, source_class):
            continue
        try:
            prompt, source_word, target_word = target_prompt(spec, caption, source_class, meta)
        except PlanError as error:
            failures.append(Failure("plan", "PlanError", f"edit {spec.name or spec.target_class}: {error}"))
            continue
        control = fill_control(spec.control, source_word, target_word)
        params = _params(spec, inversion, control, backbones)
        if spec.stochastic is not None:
            params["stochastic"] = {
                "method": spec.stochastic,
                "samples": spec.samples,
                "temperature": spec.temperature,
            }
            vae = _sampled_vae(spec, inversion)
            if vae is not None:  # the actor adds the artefact's version
                params["stochastic"]["vae"] = vae
        stochastic = spec.stochastic is not None
        group = make_edit_id(source_id, spec, inversion, prompt, None) if stochastic else None
        for seed, sample_index, sample_seed in spec.sample_seeds():
            planned.append(
                PlannedEdit(
                    edit_id=make_edit_id(source_id, spec, inversion, prompt, seed, sample_seed),
                    target_class=spec.target_class,
                    target_prompt=prompt,
                    seed=seed,
                    sample_index=sample_index,
                    control=control,
                    eta=spec.eta,
                    latent_interpolation=spec.latent_interpolation,
                    params=json.dumps(params, sort_keys=True),
                    sample_seed=sample_seed,
                    sample_temperature=spec.temperature if stochastic else None,
                    sample_group=group,
                    editors=spec.editors,
                    editor_combination=spec.combination,
                    embedding_vae=spec.vae,
                )
            )
    return planned, failures


def _sampled_vae(spec: EditSpec, inversion: InversionConfig) -> str | None:
    """The URI of the trained VAE a stochastic edit samples from: its own (cond_vae), the inversion's
    dataset-wide null-text VAE (null_text_vae with `vae`), or None (a VAE trained per image)."""
    if spec.stochastic == "null_text_vae":
        return getattr(inversion.method_params, "vae", None)
    return spec.vae


def _params(
    spec: EditSpec, inversion: InversionConfig, control: AttentionControl, backbones: dict[str, str]
) -> dict:
    """What the edits table's params column records of an edit: what produced it."""
    if spec.editors:  # the editors make the edit; the inversion and attention control play no part
        return {
            "edit": spec.name or spec.target_class,
            "method": "diffusion_clip",
            "editors": to_dict(spec.editors),
            **({"combination": spec.combination} if spec.combination != "convex" else {}),
            "metrics": backbones,
        }
    return {
        "edit": spec.name or spec.target_class,
        "inversion": to_dict(inversion),
        "control": to_dict(control),
        "eta": spec.eta,
        "latent_interpolation": spec.latent_interpolation,
        "metrics": backbones,
    }
