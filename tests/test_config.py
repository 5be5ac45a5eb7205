"""Job spec parsing: typed config, errors naming file and key, --set overrides, example specs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from pipeline.config import (
    ConfigError,
    JobConfig,
    JobInversionConfig,
    ResourcesConfig,
    StageResources,
    _check,
    load_config,
    parse_config,
    to_dict,
)
from pipeline.diffusion.control import AttentionControl
from pipeline.methods import InversionConfig, NullTextParams, PromptTuningParams

JOBS = Path(__file__).resolve().parents[1] / "jobs"
MINIMAL = {
    "input": {"shards": "data/shard-{000000..000003}.tar"},
    "model": {"path": "runwayml/stable-diffusion-v1-5"},
    "edits": [{"target_class": "fox", "control": {"mode": "refine", "reweight": [["fox", 2.0]]}}],
    "output": {"path": "out/"},
}


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_minimal_spec_builds_typed_frozen_config(tmp_path):
    config = load_config(write(tmp_path, MINIMAL))
    assert isinstance(config, JobConfig)
    assert config.input.shards == ("data/shard-{000000..000003}.tar",)  # a single string becomes a list
    # the engine defaults written out, inverting with the caption
    assert to_dict(config.inversion) == to_dict(JobInversionConfig())
    assert config.inversion.params == NullTextParams() and config.inversion.strength == 1.0
    assert isinstance(config.inversion, InversionConfig) and config.inversion.prompt == "source"
    assert config.edits[0].control == AttentionControl(mode="refine", reweight=(("fox", 2.0),))
    with pytest.raises(AttributeError):
        config.model.path = "other"  # frozen


def test_prompt_tuning_defaults_are_the_papers(tmp_path):
    """Prompt Tuning Inversion §4: N = 1, beta = 0.1, encoding ratio 0.8, plain gradient descent on the
    squared error (Algorithm 1, line 9), c_T from the target prompt."""
    config = load_config(write(tmp_path, {**MINIMAL, "inversion": {"method": "prompt_tuning"}}))
    assert config.inversion.params == PromptTuningParams(inner_steps=1, learning_rate=0.1, optimizer="sgd")
    assert config.inversion.strength == 0.8 and config.inversion.prompt == "target"
    engine_side = InversionConfig(method="prompt_tuning")
    assert engine_side.method_params == config.inversion.params and engine_side.resolved_strength == 0.8
    explicit = load_config(
        write(
            tmp_path,
            {**MINIMAL, "inversion": {"method": "prompt_tuning", "prompt": "source", "strength": 1.0}},
        )
    )
    assert explicit.inversion.prompt == "source" and explicit.inversion.strength == 1.0


def test_round_trip_through_to_dict():
    config = parse_config(MINIMAL)
    assert parse_config(to_dict(config)) == config
    stochastic = {
        **MINIMAL,
        "inversion": {"method": "null_text_vae", "epochs": 3},
        "edits": [{"target_class": "fox", "samples": 4, "stochastic": "null_text_vae", "temperature": 0.5}],
    }
    config = parse_config(stochastic)
    assert (config.edits[0].samples, config.edits[0].temperature) == (4, 0.5)
    assert parse_config(to_dict(config)) == config


@pytest.mark.parametrize(
    ("change", "key", "words"),
    [
        ({"inversion": {"methd": "ddim"}}, "inversion.methd", "unknown key"),
        ({"inversion": {"method": "magic"}}, "inversion.method", "is unknown; choose one of"),
        (
            {"inversion": {"method": "ddim", "inner_steps": 3}},
            "inversion.inner_steps",
            "for inversion.method 'ddim'",
        ),
        (
            {"inversion": {"method": "prompt_tuning", "optimizer": "lbfgs"}},
            "inversion.optimizer",
            "not one of",
        ),
        (
            {"inversion": {"method": "style_diffusion", "inner_steps": 0}},
            "inversion",
            "'style_diffusion': inner_steps=0 must be an integer >= 1",
        ),
        ({"inversion": {"num_steps": "ten"}}, "inversion.num_steps", "expected an integer"),
        ({"model": {"path": "m", "precision": "fp16"}}, "model.precision", "not one of"),
        ({"inversion": {"prompt": "caption"}}, "inversion.prompt", "not one of"),
        ({"edits": [{"target_class": "fox", "seeds": [1, 1]}]}, "edits.0.seeds", "repeats"),
        (
            {"edits": [{"target_class": "fox", "prompt": {"mode": "template"}}]},
            "edits.0.prompt.template",
            "required",
        ),
        ({"edits": [{"source_classes": ["cat"]}]}, "edits.0.target_class", "required"),
        ({"resources": {"score": {"num_gpus": "one"}}}, "resources.score.num_gpus", "expected a number"),
        ({"metrics": {"perceptual": "features:mine"}}, "metrics.feature_extractor", "required"),
        ({"filter": {"require_target_class": True}}, "filter.require_target_class", "metrics.classifier"),
        ({"surprise": 1}, "surprise", "unknown key"),
        ({"output": {"path": "o", "composite": "yes"}}, "output.composite", "expected true/false"),
        (
            {"output": {"path": "o", "composite_feather": -2}},
            "output",
            "composite_feather are pixel counts >= 0",
        ),
        ({"edits": [{"target_class": "fox", "samples": 4}]}, "edits.0.samples", "need stochastic"),
        ({"edits": [{"target_class": "fox", "samples": 0}]}, "edits.0.samples", "must be >= 1"),
        (
            {"edits": [{"target_class": "fox", "stochastic": "null_text_vae"}]},
            "edits.0.stochastic",
            "need inversion.method: null_text_vae",
        ),
        (
            {
                "inversion": {"method": "null_text_vae"},
                "edits": [{"target_class": "fox", "stochastic": "null_text_vae", "temperature": -0.5}],
            },
            "edits.0.temperature",
            "must be >= 0",
        ),
        ({"edits": [{"target_class": "fox", "stochastic": "sampled"}]}, "edits.0.stochastic", "not one of"),
        ({"edits": [{"target_class": "fox", "stochastic": "cond_vae"}]}, "edits.0.vae", "give vae"),
    ],
)
def test_bad_specs_name_file_and_key(tmp_path, change, key, words):
    path = write(tmp_path, {**MINIMAL, **change})
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(path) in str(error.value)
    assert f": {key}:" in str(error.value)
    assert words in str(error.value)


def test_set_overrides_parse_yaml_values(tmp_path):
    path = write(tmp_path, MINIMAL)
    config = load_config(
        path,
        [
            "inversion.num_steps=7",
            "edits.0.seeds=[3, 4]",
            "model.path=/models/sd",
            "filter.min_clip_t=0.2",
            "inversion.method=ddim",
        ],
        output="s3://bucket/run",
    )
    assert config.inversion.num_steps == 7 and config.inversion.method == "ddim"
    assert config.edits[0].seeds == (3, 4)
    assert config.model.path == "/models/sd"
    assert config.filter.min_clip_t == 0.2
    assert config.output.path == "s3://bucket/run"


def test_set_errors(tmp_path):
    path = write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(path, ["inversion.num_steps"])
    with pytest.raises(ConfigError, match="edits.5"):
        load_config(path, ["edits.5.seeds=[1]"])
    with pytest.raises(ConfigError, match="inversion.bogus: unknown key"):
        load_config(path, ["inversion.bogus=1"])


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")


@pytest.mark.parametrize("path", sorted(JOBS.glob("example_*.yaml")), ids=lambda p: p.name)
def test_example_job_specs_are_valid(path):
    config = load_config(path)
    assert config.edits and config.input.shards and config.output.path


@dataclass(frozen=True)
class WithCaptioning(ResourcesConfig):
    """The resources of a job with one more stage."""

    caption: StageResources = field(default_factory=lambda: StageResources(batch_size=0))


def test_every_stage_of_the_resources_is_checked():
    config = dataclasses.replace(parse_config(MINIMAL), resources=WithCaptioning())
    with pytest.raises(ConfigError, match="resources.caption: batch_size and actors must be >= 1"):
        _check(config, "job.yaml")
    _check(dataclasses.replace(config, resources=WithCaptioning(caption=StageResources())), "job.yaml")


def test_composite_settings_count_in_the_spec_digest_only_when_compositing():
    """Compositing adds to the rows, so it changes the digest (a rerun must not mix the two); its
    parameters do not matter while it is off."""
    from pipeline.config import spec_digest

    def digest(**output) -> str:
        return spec_digest(parse_config({**MINIMAL, "output": {"path": "out/", **output}}, "job.yaml"))

    plain = digest()
    assert digest(composite_dilation=9) == plain and digest(path="elsewhere/") == plain
    assert digest(composite=True) != plain
    assert digest(composite=True, composite_feather=1) != digest(composite=True)


def test_spec_digests_of_earlier_specs_are_unchanged_by_later_keys_at_their_defaults():
    """Outputs written before the later filter keys, inversion.keep_artifacts and encoder_fit_steps existed
    still resume:
    the digests below were computed by the release before them, for the same specs."""
    from pipeline.config import spec_digest

    earlier = {
        **MINIMAL,
        "filter": {"min_clip_t": 0.2},
        "inversion": {"method": "null_text", "num_steps": 20},
    }
    assert spec_digest(parse_config(MINIMAL, "job.yaml")) == (
        "3ccc4d8f1e8b85aaa2c071c25e5ce9322bdf0e2be309bd63f908b5d21f30617e"
    )
    assert spec_digest(parse_config(earlier, "job.yaml")) == (
        "cef3dcf9b7a16af91831e8ebfef124fb60e437dd6f974d134c1d2bfb0f4f57b4"
    )
    # Set, they change what is written, so they count.
    for changed in (
        {**earlier, "filter": {"min_clip_t": 0.2, "min_bg_ssim": 0.5}},
        {**earlier, "inversion": {**earlier["inversion"], "keep_artifacts": True}},
        {**earlier, "inversion": {**earlier["inversion"], "encoder_fit_steps": 100}},
    ):
        assert spec_digest(parse_config(changed, "job.yaml")) != spec_digest(
            parse_config(earlier, "job.yaml")
        )


@pytest.mark.parametrize(
    "path",
    sorted(
        path
        for path in (Path(__file__).resolve().parents[1] / "jobs").glob("*.yaml")
        if not path.name.startswith("train_")
    ),  # fmt: skip
    ids=lambda path: path.name,
)
def test_every_shipped_job_spec_loads(path):
    config = load_config(path)
    assert config.edits and config.output.path


def test_exponent_floats_without_a_dot_are_numbers_as_in_yaml_1_2(tmp_path):
    """PyYAML reads `75e-1` as a string (YAML 1.1); a float field takes it as YAML 1.2 does."""
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(MINIMAL) + "inversion: {guidance_scale: 75e-1}\n")
    assert load_config(path).inversion.guidance_scale == 7.5
    assert load_config(path, overrides=["inversion.guidance_scale=-2E+1"]).inversion.guidance_scale == -20.0
    with pytest.raises(ConfigError, match="inversion.guidance_scale: expected a number, got '7.5x'"):
        load_config(path, overrides=["inversion.guidance_scale=7.5x"])


def test_encoder_fit_steps_must_be_a_count():
    inversion = {"method": "ddim", "encoder_fit_steps": -3}
    with pytest.raises(ConfigError, match=r"inversion.encoder_fit_steps.*must be >= 0"):
        parse_config({**MINIMAL, "inversion": inversion}, "job.yaml")
    with pytest.raises(ConfigError, match=r"inversion.encoder_fit_steps"):
        parse_config({**MINIMAL, "inversion": {**inversion, "encoder_fit_steps": "many"}}, "job.yaml")
    config = parse_config({**MINIMAL, "inversion": {**inversion, "encoder_fit_steps": 40}}, "job.yaml")
    assert config.inversion.encoder_fit_steps == 40
