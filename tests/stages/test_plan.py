"""Edit planning: which edits apply, target prompts, control words and deterministic edit ids."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest

from pipeline.config import EditSpec, PromptSpec, to_dict
from pipeline.engine import AttentionControl, InversionConfig
from pipeline.stages.plan import PlanError, applies_to, make_edit_id, plan_edits, target_prompt

FOX = EditSpec(
    target_class="fox",
    source_classes=("cat", "dog"),
    seeds=(0, 1),
    control=AttentionControl(blend_words=("{source}", "{target}")),
)
TEMPLATE = EditSpec(
    target_class="dog", prompt=PromptSpec(mode="template", template="a {color} {target} near a {source}")
)
BACKBONES = {"clip": "x", "perceptual": "y"}


def test_applies_to():
    assert applies_to(FOX, "cat") and applies_to(FOX, "dog")
    assert not applies_to(FOX, "bird") and not applies_to(FOX, None)
    assert applies_to(TEMPLATE, "bird")  # empty source_classes = every class...
    assert not applies_to(TEMPLATE, "dog")  # ...except the target itself


def test_word_swap_replaces_whole_words_only():
    prompt, source, target = target_prompt(FOX, "a Cat sitting by a catapult", "cat", {})
    assert (prompt, source, target) == ("a fox sitting by a catapult", "cat", "fox")
    with pytest.raises(PlanError, match="no word 'cat'"):
        target_prompt(FOX, "a kitten", "cat", {})


def test_template_uses_meta_and_names_missing_keys():
    assert target_prompt(TEMPLATE, "a red cat", "cat", {"color": "red"})[0] == "a red dog near a cat"
    with pytest.raises(PlanError, match="color"):
        target_prompt(TEMPLATE, "a red cat", "cat", {})


def test_plan_edits_fans_out_seeds_and_fills_control_words():
    planned, failures = plan_edits(
        "s#1", "cat", "a photo of a cat", {}, (FOX, TEMPLATE), InversionConfig(), BACKBONES
    )
    assert [(f.stage, f.error_type, f.edit_id) for f in failures] == [("plan", "PlanError", None)]
    assert "color" in failures[0].message
    assert [(p.target_class, p.seed, p.sample_index) for p in planned] == [("fox", 0, 0), ("fox", 1, 1)]
    assert planned[0].control.blend_words == ("cat", "fox")
    params = json.loads(planned[0].params)
    assert params["metrics"] == BACKBONES and params["inversion"]["method"] == "null_text"


def test_edit_id_is_deterministic_and_sensitive_to_every_input():
    base = make_edit_id("s#1", FOX, InversionConfig(), "a fox", 0)
    assert base == make_edit_id("s#1", FOX, InversionConfig(), "a fox", 0)
    variants = {
        make_edit_id("s#2", FOX, InversionConfig(), "a fox", 0),
        make_edit_id("s#1", TEMPLATE, InversionConfig(), "a fox", 0),
        make_edit_id("s#1", FOX, InversionConfig.of(method="ddim"), "a fox", 0),
        make_edit_id("s#1", FOX, InversionConfig(), "a red fox", 0),
        make_edit_id("s#1", FOX, InversionConfig(), "a fox", 1),
        make_edit_id("s#1", FOX, InversionConfig(encoder_fit_steps=10), "a fox", 0),
    }
    assert base not in variants and len(variants) == 6


STOCHASTIC = dataclasses.replace(FOX, seeds=(5, 9), samples=3, stochastic="null_text_vae", temperature=0.7)
VAE = InversionConfig.of(method="null_text_vae")


def test_stochastic_samples_fan_out_with_reproducible_seeds_and_distinct_ids():
    planned, failures = plan_edits("s#1", "cat", "a photo of a cat", {}, (STOCHASTIC,), VAE, BACKBONES)
    assert failures == []
    # K samples per seed: sample k of seed s has sample_seed s * K + k and index (position of s) * K + k.
    expected = [
        (seed, position * 3 + k, seed * 3 + k) for position, seed in enumerate((5, 9)) for k in range(3)
    ]
    assert [(p.seed, p.sample_index, p.sample_seed) for p in planned] == expected
    assert len({p.edit_id for p in planned}) == 6
    assert {p.sample_temperature for p in planned} == {0.7}
    assert len({p.sample_group for p in planned}) == 1 and planned[0].sample_group not in {
        p.edit_id for p in planned
    }
    assert json.loads(planned[0].params)["stochastic"] == {
        "method": "null_text_vae",
        "samples": 3,
        "temperature": 0.7,
    }
    other, _ = plan_edits("s#2", "cat", "a photo of a cat", {}, (STOCHASTIC,), VAE, BACKBONES)
    assert other[0].sample_group != planned[0].sample_group


def test_deterministic_edits_keep_the_ids_and_params_they_had_before_samples_and_editors_existed():
    """The edit id of a spec without samples, stochastic, vae or editors (and inversion.encoder_fit_steps
    at 0), computed as it was before those keys existed."""
    planned, _ = plan_edits("s#1", "cat", "a photo of a cat", {}, (FOX,), InversionConfig(), BACKBONES)
    legacy_spec = {
        key: value
        for key, value in to_dict(dataclasses.asdict(FOX)).items()
        if key not in ("samples", "stochastic", "temperature", "vae", "editors", "combination")
    }
    legacy_spec["control"] = to_dict(FOX.control)
    for plan, seed in zip(planned, (0, 1), strict=True):
        canonical = json.dumps(
            {
                "source_id": "s#1",
                "spec": legacy_spec,
                "inversion": {
                    key: value
                    for key, value in to_dict(InversionConfig()).items()
                    if key != "encoder_fit_steps"
                },
                "prompt": plan.target_prompt,
                "seed": seed,
            },
            sort_keys=True,
        )
        assert plan.edit_id == hashlib.sha256(canonical.encode()).hexdigest()[:32]
        assert (plan.sample_seed, plan.sample_temperature, plan.sample_group) == (None, None, None)
        assert "stochastic" not in json.loads(plan.params)
