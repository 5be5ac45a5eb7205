"""Checks a job passes before Ray starts (`pipeline.preflight`, `inversa validate`): shards resolve,
the model folder's configs and weight files, metric backbones, factories, resources, durable outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
from job_data import fake_model, spec, write_small_shards
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import load_config
from pipeline.errors import JobError
from pipeline.preflight import durable_output, factory_problem, model_problems, resolve_shards

TESTS = Path(__file__).resolve().parent
runner = CliRunner()


def test_shards_resolve_by_brace_range_and_glob_and_missing_ones_are_named(tmp_path):
    written = [str(path) for path in write_small_shards(tmp_path / "data", 3)]
    urls, missing = resolve_shards([str(tmp_path / "data/shard-{000000..000003}.tar")])
    assert urls == written + [str(tmp_path / "data/shard-000003.tar")]
    assert missing == [str(tmp_path / "data/shard-000003.tar")]
    urls, missing = resolve_shards([str(tmp_path / "data/shard-*.tar"), str(tmp_path / "none/*.tar")])
    assert urls == written and missing == [str(tmp_path / "none/*.tar")]


def test_model_folder_configs_and_weight_files_are_checked(tmp_path):
    assert model_problems(str(fake_model(tmp_path / "ok"))) == []
    [problem] = model_problems(str(tmp_path / "absent"))
    assert "model.path" in problem and "absent" in problem and "no such folder" in problem
    problems = model_problems(str(fake_model(tmp_path / "configs-only", weights=False)))
    assert len(problems) == 3 and all("no weight file" in problem for problem in problems)
    broken = fake_model(tmp_path / "broken")
    (broken / "vae/config.json").write_text("{not json")
    [problem] = model_problems(str(broken))
    assert "vae/config.json cannot be read" in problem


def test_factories_must_import_and_be_callable():
    reference = f"{TESTS / 'job_data.py'}:tiny_classifier"
    assert factory_problem(reference, "metrics.classifier") is None
    typo = factory_problem(f"{TESTS / 'job_data.py'}:tiny_clasifier", "metrics.classifier")
    assert typo.startswith("metrics.classifier") and "no attribute 'tiny_clasifier'" in typo
    module = factory_problem("pipeline.world.oracel:shape_classifier", "metrics.classifier")
    assert "cannot import 'pipeline.world.oracel'" in module
    assert "does not exist" in factory_problem("/nowhere/file.py:f", "metrics.feature_extractor")
    assert "not callable" in factory_problem("pipeline.preflight:ACTOR_STAGES", "metrics.classifier")


def test_outputs_that_cannot_outlive_the_job_are_refused(tmp_path, monkeypatch):
    with pytest.raises(JobError, match="memory://x.*lost when it ends"):
        durable_output("memory://x")
    monkeypatch.chdir(tmp_path)
    assert durable_output("out/run") == str(tmp_path / "out/run")
    assert durable_output("s3://bucket/out") == "s3://bucket/out"


def test_validate_counts_shards_and_passes_a_job_that_can_run(tmp_path):
    result = runner.invoke(app, ["validate", str(spec(tmp_path))])
    assert result.exit_code == 0, result.output
    assert "shards: 3 found" in result.output and "valid" in result.output


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"input.shards": ["data/none-{0..1}.tar"]}, "input.shards: 2 not found (2 shard URLs resolved)"),
        ({"model.path": "models/absent"}, "model.path 'models/absent'"),
        ({"metrics.classifier": f"{TESTS / 'job_data.py'}:tiny_clasifier"}, "metrics.classifier"),
        ({"metrics.clip.pretrained": "/no/clip.pt"}, "metrics.clip.pretrained"),
        ({"metrics.clip.config_file": None}, "metrics.clip.model_name 'tiny' is not an open_clip model"),
        ({"metrics.clip.pretrained": "laion9000"}, "metrics.clip: ('tiny', pretrained 'laion9000')"),
        ({"resources.invert_edit.num_gpus": 1.0}, "resources: "),
        ({"output.path": "memory://out"}, "output.path"),
    ],
)
def test_validate_names_each_problem_in_one_line(tmp_path, change, named):
    result = runner.invoke(app, ["validate", str(spec(tmp_path, **change))])
    assert result.exit_code == 2, result.output
    problems = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(problems) == 1 and named in problems[0], result.output
    assert "Traceback" not in result.output
    assert runner.invoke(app, ["validate", str(tmp_path / "job.yaml"), "--spec-only"]).exit_code == 0


def test_editors_missing_of_another_kind_or_for_another_model_are_named(tmp_path, tiny_sd_path, tiny_sd):
    from editor_artefact import write_perturbed_editor

    from pipeline.training.artefact import write_artefact

    good, other_model, other_kind = (str(tmp_path / name) for name in ("good", "other-model", "other-kind"))
    write_perturbed_editor(tiny_sd, good, seed=1)
    write_perturbed_editor(tiny_sd, other_model, seed=1, fingerprint="0" * 64)
    write_artefact(other_kind, "embedding_vae", {}, {}, {}, tiny_sd.fingerprint)
    missing = str(tmp_path / "missing")

    def edits(*uris):
        return [{"target_class": "fox", "editors": [{"uri": uri, "gamma": 0.5}]} for uri in uris]

    job = spec(
        tmp_path, **{"model.path": tiny_sd_path, "edits": edits(good, other_model, other_kind, missing)}
    )
    result = runner.invoke(app, ["validate", str(job)])
    assert result.exit_code == 2, result.output
    problems = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(problems) == 3, result.output
    # One line per editor, in the spec's order.
    assert other_model in problems[0] and "trained on base model" in problems[0]
    assert other_kind in problems[1] and "'embedding_vae' artefact, not an editor" in problems[1]
    assert missing in problems[2] and "no trained artefact" in problems[2]
    assert all(line.startswith("error: edits.editors: ") for line in problems)
    assert "Traceback" not in result.output
    # `run` refuses the same spec before Ray starts, in one line.
    run = runner.invoke(app, ["run", str(job)])
    assert run.exit_code == 2 and "trained on base model" in run.output and "Traceback" not in run.output
    good_job = spec(tmp_path / "good-job", **{"model.path": tiny_sd_path, "edits": edits(good)})
    assert runner.invoke(app, ["validate", str(good_job)]).exit_code == 0


def test_cond_vae_artefacts_missing_corrupt_of_another_kind_or_model_are_named(
    tmp_path, tiny_sd_path, tiny_sd
):
    from editor_artefact import write_perturbed_editor, write_random_cond_vae

    names = ("good", "missing", "weights", "manifest", "editor", "other-model")
    good, missing, weights, manifest, editor, other_model = (str(tmp_path / name) for name in names)
    for uri in (good, weights, manifest):
        write_random_cond_vae(tiny_sd, uri, seed=1)
    (tmp_path / "weights" / "weights.safetensors").write_bytes(b"truncated")
    (tmp_path / "manifest" / "artefact.json").write_text('{"format": "inversa-art')
    write_perturbed_editor(tiny_sd, editor, seed=1)
    write_random_cond_vae(tiny_sd, other_model, seed=1, fingerprint="0" * 64)

    def edits(*uris):
        return [{"target_class": "fox", "stochastic": "cond_vae", "vae": uri, "samples": 2} for uri in uris]

    job = spec(
        tmp_path,
        **{"model.path": tiny_sd_path, "edits": edits(missing, weights, manifest, editor, other_model, good)},
    )
    result = runner.invoke(app, ["validate", str(job)])
    problems = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(problems) == 5, result.output
    assert all(line.startswith(f"error: edits[{index}].vae: ") for index, line in enumerate(problems))
    assert "no trained artefact" in problems[0]
    assert "does not match its version" in problems[1]
    assert "not valid JSON" in problems[2]
    assert "not a conditional-embedding VAE" in problems[3]
    assert "trained on base model" in problems[4]
    assert "Traceback" not in result.output
    good_job = spec(tmp_path / "good-job", **{"model.path": tiny_sd_path, "edits": edits(good)})
    assert runner.invoke(app, ["validate", str(good_job)]).exit_code == 0


def test_cond_vae_edits_need_a_vae_and_a_vae_needs_cond_vae(tmp_path):
    cases = [
        ({"stochastic": "cond_vae", "samples": 2}, "edits.0.vae"),
        ({"vae": "out/vaes/star"}, "edits.0.vae"),
        ({"stochastic": "null_text_vae", "vae": "out/vaes/star"}, "edits.0.vae"),
    ]
    for index, (edit, named) in enumerate(cases):
        job = spec(tmp_path / str(index), edits=[{"target_class": "fox", **edit}])
        result = runner.invoke(app, ["validate", str(job)])
        assert result.exit_code == 2 and named in result.output and "Traceback" not in result.output, (
            result.output
        )
    # Any inversion method: the sample is of the conditional embedding.
    job = spec(
        tmp_path / "ok", edits=[{"target_class": "fox", "stochastic": "cond_vae", "vae": "x", "samples": 2}]
    )
    result = runner.invoke(app, ["validate", str(job)])
    assert "edits.0" not in result.output and "edits[0].vae" in result.output  # only the missing artefact


def test_a_zip_encoder_edits_alone_and_only_it_takes_a_reference_that_exists(tmp_path, tiny_sd_path, tiny_sd):
    from editor_artefact import write_perturbed_editor
    from PIL import Image

    from pipeline.training.artefact import write_artefact

    clip_editor, encoder = str(tmp_path / "clip-editor"), str(tmp_path / "zip")
    write_perturbed_editor(tiny_sd, clip_editor, seed=1)
    write_artefact(encoder, "zip_encoder", {}, {}, {}, tiny_sd.fingerprint)
    reference = tmp_path / "star.png"
    Image.new("RGB", (32, 32), "yellow").save(reference)
    edits = [
        {
            "target_class": "fox",
            "editors": [{"uri": encoder, "gamma": 0.5}, {"uri": clip_editor, "gamma": 0.5}],
        },
        {"target_class": "fox", "editors": [{"uri": clip_editor, "reference": str(reference)}]},
        {"target_class": "fox", "editors": [{"uri": encoder, "reference": str(tmp_path / "missing.png")}]},
        {"target_class": "fox", "editors": [{"uri": encoder}], "combination": "conjunction"},
    ]
    job = spec(tmp_path, **{"model.path": tiny_sd_path, "edits": edits})
    result = runner.invoke(app, ["validate", str(job)])
    problems = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(problems) == 4, result.output
    assert "edits[0].editors" in problems[0] and "edits alone" in problems[0]
    assert "edits[1].editors" in problems[1] and "steers ZIP encoders only" in problems[1]
    assert "edits[2].editors" in problems[2] and "does not exist" in problems[2]
    assert "edits[3].editors" in problems[3] and "takes no combination" in problems[3]
    good = [{"target_class": "fox", "editors": [{"uri": encoder, "reference": str(reference)}]}]
    good_job = spec(tmp_path / "good", **{"model.path": tiny_sd_path, "edits": good})
    assert runner.invoke(app, ["validate", str(good_job)]).exit_code == 0


def test_editor_weights_outside_eq_14s_range_and_sampled_editor_edits_are_refused_by_the_spec(tmp_path):
    cases = [
        ({"editors": [{"uri": "a", "gamma": 0.7}, {"uri": "b", "gamma": 0.6}]}, "sum to at most 1"),
        ({"editors": [{"uri": "a", "gamma": -0.1}]}, "sum to at most 1"),
        ({"editors": [{"uri": "a"}], "seeds": [0, 1]}, "give one seed"),
        (
            {"editors": [{"uri": "a", "window": [200, 999]}, {"uri": "b", "gamma": 0.5, "window": [0, 200]}]},
            "the editors active at t=200 weigh 1.5 together",
        ),
        (
            {"editors": [{"uri": "a", "window": [300, 200]}]},
            "window [300, 200] must be two timesteps, low then high",
        ),
        ({"editors": [{"uri": "a", "window": [300]}]}, "expected 2 items"),
        ({"editors": [{"uri": "a", "gamma": -0.1}], "combination": "conjunction"}, "finite and >= 0"),
        ({"combination": "conjunction"}, "combination applies to editors"),
        ({"editors": [{"uri": "a"}], "combination": "and"}, "combination"),
    ]
    for index, (edit, named) in enumerate(cases):
        job = spec(tmp_path / str(index), edits=[{"target_class": "fox", **edit}])
        result = runner.invoke(app, ["validate", str(job)])
        assert result.exit_code == 2 and named in result.output and "Traceback" not in result.output
    handover = [{"uri": "a", "window": [201, 999]}, {"uri": "b", "gamma": 1.0, "window": [0, 200]}]
    config = load_config(spec(tmp_path / "handover", edits=[{"target_class": "fox", "editors": handover}]))
    assert [ref.window for ref in config.edits[0].editors] == [(201, 999), (0, 200)]
    assert [ref.to_mapping()["window"] for ref in config.edits[0].editors] == [[201, 999], [0, 200]]
    both = [{"uri": "a", "gamma": 1.0}, {"uri": "b", "gamma": 1.5}]
    edit = {"target_class": "fox", "editors": both, "combination": "conjunction"}
    config = load_config(spec(tmp_path / "conjunction", edits=[edit]))
    assert config.edits[0].combination == "conjunction"
    assert config.edits[0].to_mapping()["combination"] == "conjunction"


def test_a_window_starting_after_the_models_last_timestep_is_refused_by_validate(tmp_path):
    model = fake_model(tmp_path / "model")
    (model / "scheduler").mkdir()
    (model / "scheduler/scheduler_config.json").write_text('{"num_train_timesteps": 1000}')

    def window_lines(window: list[int]) -> list[str]:
        edits = [{"target_class": "fox", "editors": [{"uri": "a", "window": window}]}]
        job = spec(tmp_path / str(window[0]), **{"model.path": str(model), "edits": edits})
        result = runner.invoke(app, ["validate", str(job)])
        assert result.exit_code == 2 and "Traceback" not in result.output  # "a" does not exist either
        return [line for line in result.output.splitlines() if line.startswith("error:") and "window" in line]

    [line] = window_lines([1000, 1200])
    assert "edits[0].editors" in line and "window [1000, 1200]" in line and "last timestep 999" in line
    assert window_lines([999, 1200]) == []


def test_a_dataset_null_text_vae_missing_corrupt_of_another_kind_or_model_or_settings_is_named(
    tmp_path, tiny_sd_path, tiny_sd
):
    from editor_artefact import write_random_cond_vae, write_random_null_text_vae

    settings = {"steps": 4, "guidance_scale": 5.0, "inner_steps": 2}
    names = ("good", "missing", "weights", "cond", "other-model", "other-steps")
    good, missing, weights, cond, other_model, other_steps = (str(tmp_path / name) for name in names)
    for uri in (good, weights):
        write_random_null_text_vae(tiny_sd, uri, seed=1, settings=settings)
    (tmp_path / "weights" / "weights.safetensors").write_bytes(b"truncated")
    write_random_cond_vae(tiny_sd, cond, seed=1)
    write_random_null_text_vae(tiny_sd, other_model, seed=1, settings=settings, fingerprint="0" * 64)
    write_random_null_text_vae(tiny_sd, other_steps, seed=1, settings=settings | {"steps": 10})
    edits = [{"target_class": "fox", "stochastic": "null_text_vae", "samples": 2}]

    def job(uri: str, folder: str) -> Path:
        inversion = {
            "method": "null_text_vae",
            "num_steps": 4,
            "guidance_scale": 5.0,
            "inner_steps": 2,
            "vae": uri,
        }
        return spec(tmp_path / folder, **{"model.path": tiny_sd_path, "edits": edits, "inversion": inversion})

    expected = {
        missing: "no trained artefact",
        weights: "does not match its version",
        cond: "is a 'cond_vae' artefact, not a null-text VAE",
        other_model: "trained on base model",
        other_steps: "trained on null-text inversions with num_steps 10 (the job: 4); invert with its settings",
    }
    for index, (uri, message) in enumerate(expected.items()):
        result = runner.invoke(app, ["validate", str(job(uri, f"job-{index}"))])
        problems = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert result.exit_code == 2 and len(problems) == 1, result.output
        assert problems[0].startswith("error: inversion.vae: ") and message in problems[0], problems[0]
        assert "Traceback" not in result.output
    assert runner.invoke(app, ["validate", str(job(good, "good-job"))]).exit_code == 0
