"""The whole job on a real local Ray with the real engine and metrics on tiny random-weight models:
tables read back with their schemas, row counts add up, images decode, resume equals a clean run."""

from __future__ import annotations

import io
import json
import re
import shutil

import numpy as np
import pyarrow.dataset as pds
import pytest
import torch
import yaml
from job_data import good, tiny_classifier, write_tar
from PIL import Image

from pipeline.config import load_config
from pipeline.dataflow import JobError, run_job
from pipeline.schemas import load_schema, validate_table
from pipeline.stages.plan import applies_to
from pipeline.stages.write import shard_key

pytestmark = pytest.mark.slow


def read_table(output, name):
    """Read a table back with pyarrow (hive partitions included) in the schema's column order."""
    table_schema = load_schema(name)
    partitioning = "hive" if table_schema.partition_by else None
    table = pds.dataset(output / name, format="parquet", partitioning=partitioning).to_table()
    return table.select(list(table_schema.names)).cast(table_schema.schema)


def expected_counts(samples_by_shard, config) -> dict:
    """Counts derived from the samples as written and the edit plan, independently of the job."""
    good = [s for samples in samples_by_shard.values() for s in samples if s.bad is None]
    bad = [s for samples in samples_by_shard.values() for s in samples if s.bad is not None]
    edits = sum(len(spec.seeds) for s in good for spec in config.edits if applies_to(spec, s.source_class))
    return {"ok": len(good), "errors": len(bad), "edits": edits}


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data))).astype(np.int16)


def check_composites(edits, sources) -> None:
    """The spec composites: an edit with a mask has a composite whose every pixel lies between the
    source's and the edit's (alpha in [0, 1]), and its background is no further from the source than the
    raw edit's (the tiny model's masks may cover the whole image once dilated, so exactness outside the
    mask is left to the composite's own tests). An edit without a mask has none."""
    source_images = {
        row["source_id"]: _pixels(row["image"]) for row in sources.select(["source_id", "image"]).to_pylist()
    }
    columns = [
        "source_id",
        "image",
        "has_mask",
        "composite_image",
        "bg_mse",
        "composite_bg_mse",
        "composite_clip_t",
    ]
    rows = edits.select(columns).to_pylist()
    assert any(row["has_mask"] for row in rows)
    for row in rows:
        assert (row["composite_image"] is not None) == row["has_mask"]
        if not row["has_mask"]:
            assert row["composite_clip_t"] is None
            continue
        source, edit, composite = (
            source_images[row["source_id"]],
            _pixels(row["image"]),
            _pixels(row["composite_image"]),
        )
        assert ((composite >= np.minimum(source, edit)) & (composite <= np.maximum(source, edit))).all()
        if row["bg_mse"] is not None:
            assert row["composite_bg_mse"] <= row["bg_mse"] + 1e-9


def test_job_tables_counts_and_images(clean_run, job_assets):
    output, manifest = clean_run["output"], clean_run["manifest"]
    config = load_config(clean_run["spec"])
    expected = expected_counts(job_assets["samples"], config)
    edits, sources, errors = (read_table(output, name) for name in ("edits", "sources", "errors"))
    for name, table in (("edits", edits), ("sources", sources), ("errors", errors)):
        validate_table(name, table)

    assert sources.num_rows == expected["ok"] and set(sources.column("status").to_pylist()) == {"ok"}
    assert errors.num_rows == expected["errors"]
    assert sorted(errors.column("error_type").to_pylist()) == sorted(
        s.bad for samples in job_assets["samples"].values() for s in samples if s.bad
    )
    assert edits.num_rows == expected["edits"] == sum(sources.column("edits").to_pylist())
    assert len(set(edits.column("edit_id").to_pylist())) == edits.num_rows

    per_source = {}
    for row in edits.select(
        ["source_id", "target_class", "source_class", "seed", "target_prompt"]
    ).to_pylist():
        per_source.setdefault(row["source_id"], []).append(row)
        assert row["target_class"] != row["source_class"]
        assert row["target_class"] in row["target_prompt"]
    classify = tiny_classifier()
    columns = ["image", "width", "height", "params", "clip_t", "clip_i", "lpips", "classified_as"]
    for row in edits.select(columns).to_pylist():
        image = np.asarray(Image.open(io.BytesIO(row["image"])))
        assert image.shape == (row["height"], row["width"], 3) == (32, 32, 3)
        # The stored class is the configured classifier's reading of the stored (lossless) PNG.
        pixels = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 255.0
        assert row["classified_as"] == classify(pixels)[0]
        params = json.loads(row["params"])
        assert params["metrics"] == manifest["metrics_backbones"]
        assert -1.0 <= row["clip_t"] <= 1.0 and -1.0 <= row["clip_i"] <= 1.0 and row["lpips"] >= 0
    check_composites(edits, sources)
    for row in sources.select(["image", "reconstruction", "recon_psnr"]).to_pylist():
        assert np.asarray(Image.open(io.BytesIO(row["reconstruction"]))).shape == (32, 32, 3)
        source = np.asarray(Image.open(io.BytesIO(row["image"]))).astype(np.float64)
        recon = np.asarray(Image.open(io.BytesIO(row["reconstruction"]))).astype(np.float64)
        # The stored PSNR agrees with one computed here from the stored PNGs.
        psnr = 10 * np.log10(255.0**2 / np.mean((source - recon) ** 2))
        assert abs(psnr - row["recon_psnr"]) < 0.05

    counts = manifest["counts"]
    assert (counts["ok"], counts["edits"], counts["sources"]) == (
        expected["ok"],
        expected["edits"],
        expected["ok"],
    )
    assert counts["read"] == expected["ok"] + expected["errors"]
    # The truncated shard's rows are written and counted, but it failed as a whole: it is not complete,
    # so the job is partial and a rerun reads it again. The corrupt image of shard 0 does not fail it.
    shards = sorted(str(config.input.shards[0]).replace("{000000..000002}", f"00000{i}") for i in range(3))
    assert manifest["status"] == "partial"
    assert manifest["shards"]["complete"] == shards[:2] and manifest["shards"]["incomplete"] == shards[2:]
    [(failed, messages)] = manifest["shards"]["failed"].items()
    assert failed == shards[2] and "unreadable after 2 samples (2 reads)" in messages[0]
    assert manifest["model_fingerprint"] and manifest["versions"]["ray"]
    assert json.loads((output / "manifest.json").read_text()) == manifest

    # Observability: Ray Data's stats beside the output, per-stage figures, no GPU peak on a CPU.
    assert "InvertEditActor" in (output / "ray_data_stats.txt").read_text()
    [invert] = [stage for stage in manifest["stages"] if "InvertEditActor" in stage["operator"]]
    assert invert["output_rows"] == counts["read"] and invert["rows_per_second"] > 0
    assert invert["actors"] == 1 and 0 < invert["actor_utilisation"] <= 1.05
    assert manifest["gpu_memory_peak_bytes"] is None


def edit_rows(output) -> dict[str, tuple]:
    table = read_table(output, "edits").select(
        ["edit_id", "source_id", "target_class", "target_prompt", "seed", "sample_index"]
    )
    return {row["edit_id"]: tuple(row.values()) for row in table.to_pylist()}


def test_resume_after_interruption_equals_clean_run(clean_run, write_job_spec, tmp_path):
    output = tmp_path / "resumed"
    config = load_config(write_job_spec(output))
    shards = [str(config.input.shards[0]).replace("{000000..000002}", f"00000{i}") for i in range(3)]
    # 5 samples: all 4 rows of the first shard and one of the second, which stays incomplete.
    first = run_job(config, limit=5)
    assert first["counts"]["read"] == 5 == first["counts"]["ok"] + first["counts"]["failed"]
    assert first["shards"]["complete"] == shards[:1] and first["status"] == "partial"
    written = {path: path.stat().st_mtime_ns for path in output.glob("*/**/*.parquet")}
    assert any(path.name.startswith(shard_key(shards[1])) for path in written)  # shard 1's first row
    assert read_table(output, "sources").num_rows + read_table(output, "errors").num_rows == 5

    second = run_job(config)
    assert second["shards"]["skipped_as_complete"] == 1 and second["shards"]["incomplete"] == shards[2:]
    assert list(second["shards"]["failed"]) == shards[2:]  # truncated: read again, failed again
    # The rows written by the first run were kept, not recomputed.
    assert all(path.stat().st_mtime_ns == mtime for path, mtime in written.items())
    resumed, clean = edit_rows(output), edit_rows(clean_run["output"])
    assert resumed == clean
    assert read_table(output, "edits").num_rows == len(clean)  # no edit_id twice
    for name in ("sources", "errors"):
        assert sorted(read_table(output, name).column("source_id").to_pylist()) == sorted(
            read_table(clean_run["output"], name).column("source_id").to_pylist()
        )
    assert second["counts"] == clean_run["manifest"]["counts"]

    third = run_job(config)  # only the truncated shard is left: it is read again and fails again
    assert third["shards"]["skipped_as_complete"] == 2 and edit_rows(output) == clean
    assert third["counts"] == clean_run["manifest"]["counts"]


def test_a_failed_shard_is_retried_by_the_next_run(job_assets, ray_local, write_job_spec, tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    folder = tmp_path / "shards"
    folder.mkdir()
    shutil.copy(job_assets["shards"][0], folder / "shard-000000.tar")
    output = tmp_path / "retried"
    spec = write_job_spec(output)
    data = yaml.safe_load(spec.read_text())
    data["input"]["shards"] = [str(folder / "shard-{000000..000001}.tar")]
    spec.write_text(yaml.safe_dump(data))
    missing = str(folder / "shard-000001.tar")

    first = CliRunner().invoke(app, ["run", str(spec)])
    assert first.exit_code == 1, first.output
    assert "partial" in first.output and missing in first.output
    assert re.search(r"shards done 1/2, 1 failed, samples \d+, [\d.]+ images/s", first.output), first.output
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["status"] == "partial" and list(manifest["shards"]["failed"]) == [missing]
    assert missing in read_table(output, "errors").column("source_id").to_pylist()

    samples = [good("s1/fox-b", "fox", 21), good("s1/cat-e", "cat", 22)]
    write_tar(folder / "shard-000001.tar", samples)
    second = CliRunner().invoke(app, ["run", str(spec)])
    assert second.exit_code == 0, second.output
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["shards"]["failed"] == {}
    expected = expected_counts(
        {"shard-000000.tar": job_assets["samples"]["shard-000000.tar"], "shard-000001.tar": samples},
        load_config(spec),
    )
    errors = read_table(output, "errors").column("source_id").to_pylist()
    assert missing not in errors and len(errors) == expected["errors"]  # the failure row is gone
    assert read_table(output, "sources").num_rows == expected["ok"] == manifest["counts"]["ok"]
    assert read_table(output, "edits").num_rows == expected["edits"] == manifest["counts"]["edits"]


def test_other_spec_into_same_output_is_refused(clean_run, write_job_spec, tmp_path):
    output = tmp_path / "refuse"
    config = load_config(write_job_spec(output))
    run_job(config, limit=1)
    changed = load_config(write_job_spec(output), ["inversion.num_steps=3"])
    with pytest.raises(JobError, match="--overwrite"):
        run_job(changed)
    manifest = run_job(changed, overwrite=True, limit=1)
    assert manifest["counts"]["read"] <= 1


def test_stochastic_samples_become_k_rows_with_their_diversity(ray_local, write_job_spec, tmp_path):
    """samples: 3 with stochastic: null_text_vae: three rows per edited source, each with its own
    sample_index, sample_seed and edit_id, sharing one sample_group and its diversity."""
    output = tmp_path / "out"
    inversion = {"method": "null_text_vae", "num_steps": 3, "inner_steps": 1, "guidance_scale": 3.0}
    inversion |= {"epochs": 1, "hidden_dim": 8}
    edits = [{"target_class": "fox", "source_classes": ["cat", "dog"], "samples": 3}]
    edits[0] |= {"stochastic": "null_text_vae", "temperature": 1.0}
    run_job(load_config(write_job_spec(output, inversion=inversion, edits=edits)), limit=2)
    rows = read_table(output, "edits").to_pylist()
    assert rows and len(rows) % 3 == 0
    assert len({row["edit_id"] for row in rows}) == len(rows)
    by_source: dict[str, list[dict]] = {}
    for row in rows:
        by_source.setdefault(row["source_id"], []).append(row)
    for samples in by_source.values():
        assert sorted(row["sample_index"] for row in samples) == [0, 1, 2]
        assert sorted(row["sample_seed"] for row in samples) == [0, 1, 2]
        assert len({row["sample_group"] for row in samples}) == 1
        assert len({row["diversity"] for row in samples}) == 1 and samples[0]["diversity"] is not None
        assert samples[0]["diversity_bound"] is not None


def test_kept_inversions_restore_to_the_written_reconstructions(
    clean_run, job_assets, write_job_spec, tmp_path
):
    """inversion.keep_artifacts: every ok source names its stored inversions, which restore (on the same
    model) to the reconstruction the job wrote; the edit ids are the clean run's."""
    from pipeline.engine import EditRequest, edit
    from pipeline.inversion_state import read_inversions
    from pipeline.models.loading import load_diffusion_model

    output = tmp_path / "kept"
    data = yaml.safe_load(write_job_spec(output).read_text())
    spec = write_job_spec(output, inversion={**data["inversion"], "keep_artifacts": True})
    manifest = run_job(load_config(spec), limit=3)
    sources = read_table(output, "sources").to_pylist()
    ok = [row for row in sources if row["status"] == "ok"]
    assert ok and all(len(row["inversions"]) == 1 for row in ok)
    assert all(row["inversions"] is None for row in sources if row["status"] != "ok")
    files = sorted(str(path.relative_to(output)) for path in output.glob("artifacts/**/*.safetensors"))
    assert files == sorted(path for row in ok for path in row["inversions"])

    clean = edit_rows(clean_run["output"])
    kept = edit_rows(output)
    assert kept and all(clean[edit_id] == row for edit_id, row in kept.items())

    model = load_diffusion_model(job_assets["model"])
    restored = read_inversions(model, [str(output / row["inversions"][0]) for row in ok])
    written = np.stack([np.asarray(Image.open(io.BytesIO(row["reconstruction"]))) for row in ok])
    np.testing.assert_array_equal(restored.reconstructions.numpy(), written)
    assert restored.source_prompts == [row["caption"] for row in ok]
    again = edit(
        model, restored, [EditRequest(0, ok[0]["caption"].replace("cat", "fox").replace("dog", "fox"))]
    )
    assert again[0].error is None and again[0].image.shape == written[0].shape
    assert manifest["counts"]["ok"] == len(ok)


def test_editor_edits_are_rows_of_the_job_with_what_made_them(
    ray_local, job_assets, write_job_spec, tmp_path
):
    """An edit naming a trained editor by URI writes one scored row per edited source, recording the
    editor's URI, weight and version; a Prompt-to-Prompt edit of the same spec runs beside it."""
    from editor_artefact import write_perturbed_editor

    from pipeline.models.loading import load_diffusion_model

    uri = str(tmp_path / "editor")
    version = write_perturbed_editor(load_diffusion_model(job_assets["model"]), uri, seed=3)
    output = tmp_path / "out"
    edits = [
        {"target_class": "fox", "source_classes": ["cat", "dog"], "editors": [{"uri": uri, "gamma": 0.8}]},
        {"target_class": "dog", "source_classes": ["cat"]},
    ]
    inversion = {"method": "ddim", "num_steps": 3, "guidance_scale": 3.0}
    run_job(load_config(write_job_spec(output, inversion=inversion, edits=edits)), limit=2)
    rows = read_table(output, "edits").to_pylist()
    by_editor = [row for row in rows if "editors" in json.loads(row["params"])]
    assert by_editor and len(by_editor) == len([row for row in rows if row["target_class"] == "fox"])
    for row in by_editor:
        assert json.loads(row["params"])["editors"] == [{"uri": uri, "gamma": 0.8, "version": version}]
        assert row["clip_t"] is not None and row["has_mask"] is False and row["method"] == "diffusion_clip"
    assert any("control" in json.loads(row["params"]) for row in rows)
