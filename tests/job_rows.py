"""The rows a job over the test shards must write, derived from the samples as written and the edit plan
(not from the job), and the rows an output holds, read back with pyarrow through fsspec (any URI)."""

from __future__ import annotations

import json

import fsspec
import pyarrow.dataset as pds

from pipeline.config import JobConfig
from pipeline.schemas import load_schema
from pipeline.stages.plan import applies_to


def expected_rows(samples_by_shard: dict, shard_urls: dict[str, str], config: JobConfig) -> dict[str, list]:
    """{"sources": source ids, "errors": (source_id, error_type), "edits": (source_id, target_class,
    seed)}, each sorted, one entry per row the job must write.

    Args:
        samples_by_shard: shard file name -> samples (`job_data.job_shards`).
        shard_urls: shard file name -> the URL the job reads it from.
        config: the job spec (its edits decide the edit rows).
    """
    sources, errors, edits = [], [], []
    for name, samples in samples_by_shard.items():
        url = shard_urls[name]
        for sample in samples:
            # A truncated tar's damage is reported against the shard itself, not a sample.
            source_id = url if sample.bad == "TruncatedTar" else f"{url}#{sample.key}"
            if sample.bad is not None:
                errors.append((source_id, sample.bad))
                continue
            sources.append(source_id)
            for spec in config.edits:
                if applies_to(spec, sample.source_class):
                    edits += [(source_id, spec.target_class, seed) for seed in spec.seeds]
    return {"sources": sorted(sources), "errors": sorted(errors), "edits": sorted(edits)}


def read_table(output: str, name: str):
    """Table `name` of the output at URI `output` (local path, file://, s3://), hive partitions included."""
    fs, root = fsspec.core.url_to_fs(str(output))
    partitioning = "hive" if load_schema(name).partition_by else None
    return pds.dataset(
        f"{root}/{name}", filesystem=fs, format="parquet", partitioning=partitioning
    ).to_table()


def actual_rows(output: str) -> dict[str, list]:
    """The output's rows in the shape of `expected_rows` (duplicates kept), plus its edit ids."""
    edits = read_table(output, "edits").to_pylist()
    return {
        "sources": sorted(row["source_id"] for row in read_table(output, "sources").to_pylist()),
        "errors": sorted(
            (row["source_id"], row["error_type"]) for row in read_table(output, "errors").to_pylist()
        ),
        "edits": sorted((row["source_id"], row["target_class"], row["seed"]) for row in edits),
        "edit_ids": [row["edit_id"] for row in edits],
    }


def truncated_shards(samples_by_shard: dict, shard_urls: dict[str, str]) -> set[str]:
    """URLs of the shards built truncated: no run can complete them (`job_data.job_shards`)."""
    return {
        shard_urls[name]
        for name, samples in samples_by_shard.items()
        if any(sample.bad == "TruncatedTar" for sample in samples)
    }


def ended_as_an_uninterrupted_run(output: str, exit_code: int, truncated: set[str]) -> bool:
    """Whether a run ended as one without faults does: every shard complete except the truncated ones,
    which are recorded as failed, status `partial` and exit code 1 (0 when there are none)."""
    fs, root = fsspec.core.url_to_fs(str(output))
    if not fs.exists(f"{root}/manifest.json"):
        return False
    shards = json.loads(fs.cat_file(f"{root}/manifest.json"))["shards"]
    return (
        exit_code == (1 if truncated else 0)
        and set(shards["incomplete"]) == truncated
        and set(shards["failed"]) == truncated
    )
