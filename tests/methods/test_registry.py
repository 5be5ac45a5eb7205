"""The method registry: a method added as one file runs through invert, edit, the job spec and a job."""

from __future__ import annotations

import pytest
import torch
from dummy_method import NAME, DummyParams

from pipeline.config import ConfigError, parse_config
from pipeline.engine import EditRequest, EngineInputError, InversionConfig, edit, invert
from pipeline.methods import NullTextParams, UnknownMethodError, get_method, method_names
from pipeline.models.vae import encode_images


def test_builtin_methods_are_registered_with_their_modules():
    assert {"ddim", "null_text", "negative_prompt", "prompt_tuning", "direct"} <= set(method_names())
    assert get_method("null_text").module == "pipeline.methods.null_text"


def test_a_method_in_its_own_file_runs_through_invert_and_edit(tiny_sd, images, prompts):
    config = InversionConfig(method=NAME, num_steps=3, guidance_scale=3.0, params=DummyParams(scale=0.5))
    inversion = invert(tiny_sd, images[:2], prompts[:2], config)
    clean = inversion.latents.trajectory[0]
    results = edit(tiny_sd, inversion, [EditRequest(1, prompts[0]), EditRequest(0, prompts[1])])
    # the method's edit hook steers every edit onto its pivots: 0.5 * z_0 of its own image
    torch.testing.assert_close(results[0].latents, clean[1])
    torch.testing.assert_close(results[1].latents, clean[0])
    torch.testing.assert_close(clean, 0.5 * encode_images(tiny_sd, images[:2]))


def test_params_of_another_method_are_refused(tiny_sd, images, prompts):
    config = InversionConfig(method="null_text", params=DummyParams())
    with pytest.raises(EngineInputError, match="must be a NullTextParams"):
        invert(tiny_sd, images[:1], prompts[:1], config)


def test_unknown_methods_name_the_choices_and_the_fix():
    with pytest.raises(UnknownMethodError, match="choose one of"):
        get_method("magic")
    with pytest.raises(UnknownMethodError, match="module 'no_such_module' cannot be imported"):
        get_method("no_such_module:magic")


SPEC = {
    "input": {"shards": "data/shard-{000000..000001}.tar"},
    "model": {"path": "model"},
    "edits": [{"target_class": "fox"}],
    "output": {"path": "out/"},
}


def test_the_job_spec_takes_the_methods_own_keys():
    config = parse_config({**SPEC, "inversion": {"method": NAME, "scale": 0.25, "num_steps": 4}})
    assert config.inversion.params == DummyParams(scale=0.25) and config.inversion.num_steps == 4
    with pytest.raises(ConfigError, match=r"inversion.inner_steps: unknown key for inversion.method"):
        parse_config({**SPEC, "inversion": {"method": NAME, "inner_steps": 2}})


@pytest.mark.slow
def test_a_method_in_its_own_file_runs_as_a_job(ray_local, write_job_spec, clean_run, tmp_path):
    import pyarrow.parquet as pq

    from pipeline.config import load_config
    from pipeline.dataflow import run_job

    output = tmp_path / "dummy"
    spec = write_job_spec(
        output, inversion={"method": NAME, "scale": 0.5, "num_steps": 2, "guidance_scale": 3.0}
    )
    manifest = run_job(load_config(spec))
    assert manifest["counts"] == clean_run["manifest"]["counts"]
    edits = pq.read_table(output / "edits").to_pylist()
    assert edits and all(NAME in row["params"] for row in edits)


def test_settings_without_a_method_are_null_texts_with_the_papers_defaults():
    config = InversionConfig.of(num_steps=7)
    assert config.method == "null_text" and config.num_steps == 7
    assert config.method_params == NullTextParams()
