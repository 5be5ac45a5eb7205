"""The whole job on a real local Ray with the real engine and metrics on tiny random-weight models:
tables read back with their schemas, row counts add up, images decode, resume equals a clean run."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.dataset as pds
import pytest
import torch
from job_data import tiny_classifier
from PIL import Image

from pipeline.config import load_config
from pipeline.dataflow import JobError, run_job
from pipeline.schemas import load_schema, validate_table
from pipeline.stages.plan import applies_to

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
    assert manifest["shards"]["incomplete"] == [] and len(manifest["shards"]["complete"]) == 3
    assert manifest["model_fingerprint"] and manifest["versions"]["ray"]
    assert json.loads((output / "manifest.json").read_text()) == manifest


def edit_rows(output) -> dict[str, tuple]:
    table = read_table(output, "edits").select(
        ["edit_id", "source_id", "target_class", "target_prompt", "seed", "sample_index"]
    )
    return {row["edit_id"]: tuple(row.values()) for row in table.to_pylist()}


def test_resume_after_interruption_equals_clean_run(clean_run, write_job_spec, tmp_path):
    output = tmp_path / "resumed"
    config = load_config(write_job_spec(output))
    # 5 samples: all 4 rows of the first shard and one of the second, which stays incomplete.
    first = run_job(config, limit=5)
    assert first["shards"]["complete"] == [str(config.input.shards[0]).replace("{000000..000002}", "000000")]
    partial_files = list((output / "sources").glob("*.parquet"))
    assert len({path.name.split(".")[0] for path in partial_files}) == 2  # shard 1's partial rows are on disk

    second = run_job(config)
    assert second["shards"]["skipped_as_complete"] == 1 and second["shards"]["incomplete"] == []
    resumed, clean = edit_rows(output), edit_rows(clean_run["output"])
    assert resumed == clean
    assert read_table(output, "edits").num_rows == len(clean)  # no edit_id twice
    for name in ("sources", "errors"):
        assert sorted(read_table(output, name).column("source_id").to_pylist()) == sorted(
            read_table(clean_run["output"], name).column("source_id").to_pylist()
        )
    assert second["counts"] == clean_run["manifest"]["counts"]

    third = run_job(config)  # nothing left to do
    assert third["shards"]["skipped_as_complete"] == 3 and edit_rows(output) == clean


def test_other_spec_into_same_output_is_refused(clean_run, write_job_spec, tmp_path):
    output = tmp_path / "refuse"
    config = load_config(write_job_spec(output))
    run_job(config, limit=1)
    changed = load_config(write_job_spec(output), ["inversion.num_steps=3"])
    with pytest.raises(JobError, match="--overwrite"):
        run_job(changed)
    manifest = run_job(changed, overwrite=True, limit=1)
    assert manifest["counts"]["read"] <= 1
