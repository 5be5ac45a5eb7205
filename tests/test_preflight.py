"""Checks a job passes before Ray starts (`pipeline.preflight`, `inversa validate`): shards resolve,
the model folder's configs and weight files, metric backbones, factories, resources, durable outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
from job_data import fake_model, spec, write_small_shards
from typer.testing import CliRunner

from pipeline.cli import app
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
