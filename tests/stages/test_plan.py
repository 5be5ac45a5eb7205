"""Edit planning: which edits apply, target prompts, control words and deterministic edit ids."""

from __future__ import annotations

import json

import pytest

from pipeline.config import EditSpec, PromptSpec
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
    }
    assert base not in variants and len(variants) == 5
