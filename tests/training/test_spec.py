"""Training specs: parsing and checking, `inversa train` on bad input, `inversa submit` of a training spec."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipeline import cli
from pipeline.config import ConfigError
from pipeline.training.spec import load_train_spec, parse_train_spec, to_mapping, with_local_paths_resolved

ROOT = Path(__file__).resolve().parents[2]
SPECS = sorted((ROOT / "jobs").glob("train_diffusion_clip_*.yaml"))
ZIP_SPECS = sorted((ROOT / "jobs").glob("train_zip_*.yaml"))
runner = CliRunner()


def _spec(**changes) -> dict:
    data = yaml.safe_load(SPECS[0].read_text())
    for dotted, value in changes.items():
        node = data
        *parents, last = dotted.split("__")
        for part in parents:
            node = node[part]
        node[last] = value
    return data


@pytest.mark.parametrize("path", SPECS, ids=lambda path: path.name)
def test_shipped_training_specs_parse_and_round_trip(path):
    spec = load_train_spec(path)
    assert spec.kind == "diffusion_clip" and spec.task.forward_steps == 40 and spec.task.generative_steps == 6
    assert parse_train_spec(to_mapping(spec)) == spec


@pytest.mark.parametrize("path", ZIP_SPECS, ids=lambda path: path.name)
def test_shipped_zip_specs_parse_round_trip_and_keep_the_papers_fig_4_window(path):
    spec = load_train_spec(path)
    assert spec.kind == "zip_encoder" and (spec.task.return_step, spec.task.zip_step) == (600, 300)
    assert parse_train_spec(to_mapping(spec)) == spec


def test_an_unknown_zip_key_and_a_window_upside_down_are_refused():
    data = yaml.safe_load(ZIP_SPECS[0].read_text())
    data["zip_encoder"]["t_zip"] = 300
    with pytest.raises(ConfigError, match="t_zip"):
        parse_train_spec(data)
    data = yaml.safe_load(ZIP_SPECS[0].read_text())
    data["zip_encoder"]["zip_step"] = 700
    with pytest.raises((ConfigError, ValueError), match="zip_step"):
        parse_train_spec(data)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"kind": "gan"}, "kind: 'gan' is not a trainable kind"),
        ({"diffusion_clip__learning_rate": 0.1}, "diffusion_clip.learning_rate: unknown key"),
        ({"run__workers": 3}, "diffusion_clip.batch: 8 is not a multiple of run.workers=3"),
        ({"diffusion_clip__variant": "fast"}, "diffusion_clip.variant: 'fast' is not one of"),
        ({"run__iterations": "many"}, "run.iterations: expected an integer"),
        ({"epochs": 3}, "epochs: unknown key"),
    ],
)
def test_bad_training_specs_name_the_key(changes, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        parse_train_spec(_spec(**changes))


def test_relative_paths_become_absolute_for_the_workers(tmp_path):
    spec = with_local_paths_resolved(load_train_spec(SPECS[0]), base=ROOT)
    assert spec.output == str(ROOT / "out/editors" / Path(spec.output).name)
    assert spec.task.model == str(ROOT / "pipeline/world/assets/shapes-sd")
    assert Path(spec.task.clip.pretrained).is_absolute() and Path(spec.task.clip.model_config).is_file()
    remote = parse_train_spec(_spec(output="s3://bucket/editors/star"))
    assert with_local_paths_resolved(remote, base=tmp_path).output == "s3://bucket/editors/star"


def test_train_refuses_a_bad_spec_in_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_spec(diffusion_clip__return_step=5000)))
    result = runner.invoke(cli.app, ["train", str(bad)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "return_step=5000 must be in [1, 999]" in result.output


def test_train_refuses_a_missing_given_reference_in_one_line_before_starting_ray(tmp_path, monkeypatch):
    import ray

    data = yaml.safe_load((ROOT / "jobs" / "train_zip_star_styled_given.yaml").read_text())
    data["zip_encoder"]["given_references"][1]["image"] = "jobs/data/star_references/pink_0.png"
    spec = tmp_path / "given.yaml"
    spec.write_text(yaml.safe_dump(data))
    monkeypatch.chdir(ROOT)  # relative paths are read against the working folder
    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: pytest.fail("Ray started for a bad spec"))
    result = runner.invoke(cli.app, ["train", str(spec)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "zip_encoder.given_references.1.image: no file 'jobs/data/star_references/pink_0.png'" in (
        " ".join(result.output.split())
    )
    assert with_local_paths_resolved(load_train_spec(ROOT / "jobs" / "train_zip_star_styled_given.yaml"))


def test_submit_runs_inversa_train_for_a_training_spec(monkeypatch):
    submitted = {}

    class Client:
        def submit_job(self, entrypoint, runtime_env):
            submitted.update(entrypoint=entrypoint, runtime_env=runtime_env)
            return "raysubmit_1"

    monkeypatch.setattr(cli, "_client", lambda address: Client())
    result = runner.invoke(
        cli.app, ["submit", str(SPECS[0]), "--address", "http://head:8265", "--set", "run.workers=2"]
    )
    assert result.exit_code == 0, result.output
    assert submitted["entrypoint"] == f"python -m pipeline.cli train env:{cli.SPEC_VARIABLE}"
    spec = parse_train_spec(yaml.safe_load(submitted["runtime_env"]["env_vars"][cli.SPEC_VARIABLE]))
    assert spec.run.workers == 2 and spec.kind == "diffusion_clip"


def test_the_shipped_cond_vae_spec_round_trips_and_keeps_the_edits_of_the_job_that_uses_it():
    from pipeline.config import load_config

    spec = load_train_spec(ROOT / "jobs" / "train_cond_vae_star.yaml")
    assert spec.kind == "cond_vae" and parse_train_spec(to_mapping(spec)) == spec
    job = load_config(ROOT / "jobs" / "shapes_cond_vae.yaml")
    (edit,) = job.edits
    assert edit.stochastic == "cond_vae" and edit.vae == f"{spec.output}/artefact"
    task = spec.task
    # The VAE learns from the edits the job makes: same inversion, grid, guidance and word-swap windows.
    assert (task.inversion, task.steps, task.guidance_scale) == (
        job.inversion.method,
        job.inversion.num_steps,
        job.inversion.guidance_scale,
    )
    assert (task.cross_replace_steps, task.self_replace_steps) == (
        edit.control.cross_replace_steps,
        edit.control.self_replace_steps,
    )
    assert task.data.value == edit.target_class
    data = yaml.safe_load((ROOT / "jobs" / "train_cond_vae_star.yaml").read_text())
    data["cond_vae"]["gama"] = -0.1
    with pytest.raises(ConfigError, match="cond_vae.gama"):
        parse_train_spec(data)


def test_the_shipped_null_text_vae_spec_round_trips_and_matches_the_job_that_samples_from_it():
    from pipeline.config import load_config

    spec = load_train_spec(ROOT / "jobs" / "train_null_text_vae.yaml")
    assert spec.kind == "null_text_vae" and parse_train_spec(to_mapping(spec)) == spec
    job = load_config(ROOT / "jobs" / "shapes_null_text_vae.yaml")
    params = job.inversion.method_params
    assert job.inversion.method == "null_text_vae" and params.vae == f"{spec.output}/artefact"
    (edit,) = job.edits
    assert edit.stochastic == "null_text_vae" and edit.samples > 1
    # The VAE learns the phi_t the job's null-text inversion gives: the same settings (validate checks).
    assert spec.task.inversion_settings() == {
        "num_steps": job.inversion.num_steps,
        "guidance_scale": job.inversion.guidance_scale,
        "inner_steps": params.inner_steps,
        "learning_rate": params.learning_rate,
        "early_stop_epsilon": params.early_stop_epsilon,
    }
    data = yaml.safe_load((ROOT / "jobs" / "train_null_text_vae.yaml").read_text())
    data["null_text_vae"]["data"]["image_count"] = 3
    with pytest.raises(ConfigError, match="null_text_vae.data.image_count"):
        parse_train_spec(data)


def test_the_zip_job_applies_the_encoder_the_teacher_spec_writes():
    from pipeline.config import load_config

    spec = load_train_spec(ROOT / "jobs" / "train_zip_star_teacher.yaml")
    job = load_config(ROOT / "jobs" / "shapes_zip.yaml")
    uris = {editor.uri for edit in job.edits for editor in edit.editors}
    assert uris == {f"{spec.output}/artefact"}
    assert all(edit.target_class == spec.task.data.value for edit in job.edits)


def test_the_given_star_references_are_the_renderers_and_not_the_benchmarks_user_reference(tmp_path):
    import importlib.util

    import numpy as np
    from PIL import Image

    from benchmarks.zip_world import user_reference
    from pipeline.world.generator import COLORS

    spec = load_train_spec(ROOT / "jobs" / "train_zip_star_styled_given.yaml")
    drawer_path = ROOT / "jobs" / "data" / "draw_star_references.py"
    drawer_spec = importlib.util.spec_from_file_location("draw_star_references", drawer_path)
    drawer = importlib.util.module_from_spec(drawer_spec)
    drawer_spec.loader.exec_module(drawer)
    drawer.FOLDER = tmp_path
    redrawn = {path.name: np.array(Image.open(path)) for path in drawer.main()}
    assert len(spec.task.given_references) == len(redrawn) == 12
    for reference in spec.task.given_references:
        shipped = np.array(Image.open(ROOT / reference.image))
        name = Path(reference.image).name
        np.testing.assert_array_equal(shipped, redrawn[name])  # the committed file is what the script draws
        color = reference.prompt.split()[1]
        assert name.startswith(f"{color}_")  # its prompt names the colour drawn
        assert (shipped == COLORS[color]).all(axis=-1).sum() > 100  # a star's interior in that colour
        assert not np.array_equal(shipped, user_reference(color).numpy())
