"""L_prior's config: what it refuses, and how a YAML mapping reaches it."""

from __future__ import annotations

import pytest

from pipeline.training.diffusion_clip import config_from_mapping
from pipeline.training.prior import PriorConfig


def test_the_prior_refuses_a_negative_weight_or_guidance_and_options_without_a_weight():
    with pytest.raises(ValueError, match="prior.weight=-1"):
        PriorConfig(weight=-1.0)
    with pytest.raises(ValueError, match="prior.guidance=-1"):
        PriorConfig(weight=1.0, guidance=-1.0)
    for options in ({"form": "delta"}, {"condition": "texts"}, {"guidance": 7.5}):
        with pytest.raises(ValueError, match="set prior.weight > 0"):
            PriorConfig(**options)
    assert PriorConfig(weight=2.0, condition="texts", guidance=7.5, form="delta").form == "delta"


def test_a_training_mapping_builds_the_nested_prior_and_refuses_unknown_keys():
    config = config_from_mapping({"prior": {"weight": 10.0, "condition": "texts", "form": "delta"}})
    assert config.prior == PriorConfig(weight=10.0, condition="texts", form="delta")
    assert config_from_mapping({}).prior == PriorConfig()
    with pytest.raises(TypeError, match="scale"):
        config_from_mapping({"prior": {"weight": 1.0, "scale": 2.0}})
