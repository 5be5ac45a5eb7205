"""Schemas and the writer: language-neutral schema files, validation, files read back, filter flags."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.dataset as pds
import pytest

from pipeline.config import FilterConfig
from pipeline.schemas import SchemaError, load_schema, schema_dir, to_table, validate_table
from pipeline.stages.filter import filter_reason
from pipeline.stages.write import remove_shard_files, shard_key, write_tables


def error_row(source_id: str, **changes) -> dict:
    return {
        "source_id": source_id,
        "stage": "read",
        "error_type": "CorruptImage",
        "error": "bad",
        "edit_id": None,
        **changes,
    }


def _object_column(value):
    """A one-row object column holding `value` as it is (arrays included)."""
    import numpy as np

    array = np.empty(1, dtype=object)
    array[0] = value
    return array


def one_row_batch(image, records: list[dict], edit_images, **columns) -> dict:
    """A processed batch of one ok sample with its edit records, as the write stage receives it."""
    import numpy as np

    return {
        "source_id": _object_column("s#1"),
        "status": _object_column("ok"),
        "failures": _object_column("[]"),
        "model_id": _object_column("tiny"),
        "invert_seconds": np.array([1.0]),
        "image": image[None],
        "recon": image[None],
        "edits_json": _object_column(json.dumps(records)),
        "edit_images": _object_column(edit_images),
        "source_class": _object_column("cat"),
        "caption": _object_column("a cat"),
        "orig_width": np.array([8]),
        "orig_height": np.array([8]),
        **{name: np.array([30.0]) for name in ("recon_psnr", "recon_ssim", "recon_lpips")},
        **{name: _object_column(value) for name, value in columns.items()},
    }


def test_schema_files_define_every_column_once():
    for name in ("edits", "sources", "errors"):
        spec = json.loads((schema_dir() / f"{name}.json").read_text())
        names = [column["name"] for column in spec["columns"]]
        assert len(names) == len(set(names))
        assert all(column["description"] for column in spec["columns"])
        assert load_schema(name).names == tuple(names)
    issue_columns = "edit_id source_id source_class target_class method source_prompt target_prompt seed sample_index params image width height clip_t clip_i clip_dir lpips bg_psnr bg_lpips passed_filter filter_reason invert_seconds edit_seconds model_id"
    assert set(issue_columns.split()) <= set(load_schema("edits").names)


def test_to_table_refuses_bad_rows():
    with pytest.raises(SchemaError, match="missing columns \\['edit_id'\\]"):
        to_table("errors", [{k: v for k, v in error_row("a").items() if k != "edit_id"}])
    with pytest.raises(SchemaError, match="'stage' is not nullable"):
        to_table("errors", [error_row("a", stage=None)])
    with pytest.raises(SchemaError, match="'error'"):
        to_table("errors", [error_row("a", error=3.5)])
    table = to_table("errors", [error_row("a")])
    validate_table("errors", table)


def test_write_tables_partitions_and_reads_back(tmp_path):
    key = shard_key("s3://bucket/data/shard-000001.tar")
    rows = [error_row(f"x#{i}") for i in range(3)]
    written = write_tables(str(tmp_path), key, "d1", {"edits": [], "sources": [], "errors": rows})
    assert written == [f"errors/{key}.d1.parquet"]
    table = pds.dataset(tmp_path / "errors", format="parquet").to_table()
    validate_table("errors", table)
    assert table.column("source_id").to_pylist() == [f"x#{i}" for i in range(3)]
    # Files of another shard survive the removal of this shard's files.
    write_tables(str(tmp_path), shard_key("other.tar"), "d2", {"edits": [], "sources": [], "errors": rows})
    assert remove_shard_files(str(tmp_path), key) == 1
    assert [p.name for p in Path(tmp_path / "errors").iterdir()] == [f"{shard_key('other.tar')}.d2.parquet"]


def test_shard_keys_are_distinct_and_file_safe():
    keys = {shard_key(f"s3://b/{folder}/shard-000000.tar") for folder in ("a", "b")}
    assert len(keys) == 2 and all("/" not in key and "." not in key for key in keys)


def test_filter_reason():
    thresholds = FilterConfig(min_clip_t=0.25, max_lpips=0.5, min_bg_psnr=20.0)
    assert filter_reason({"clip_t": 0.3, "lpips": 0.1, "bg_psnr": 25.0}, thresholds) is None
    assert (
        filter_reason({"clip_t": 0.2, "lpips": 0.6, "bg_psnr": None}, thresholds)
        == "clip_t<0.25; lpips>0.5; bg_psnr undefined"
    )
    assert filter_reason({"clip_t": None}, FilterConfig()) is None


def test_write_summary_names_the_shards_own_failures_only(tmp_path):
    import numpy as np
    from job_data import job_shards, write_tar

    from pipeline.config import InputFields, ReadRetry
    from pipeline.stages.read import read_shard
    from pipeline.stages.write import write_batch

    paths, _ = job_shards(tmp_path / "shards")
    empty = write_tar(tmp_path / "empty.tar", [])
    retry = ReadRetry(attempts=2, backoff_seconds=0.0)
    rows = [
        row
        for shard in (str(paths[0]), str(tmp_path / "absent.tar"), str(empty))
        for row in read_shard({"shard": shard}, InputFields(), retry)
        if row["status"] != "ok"  # the writer's read-failed rows need no model columns
    ]
    batch = {name: np.array([row[name] for row in rows], dtype=object) for name in rows[0] if name != "image"}
    batch["model_fingerprint"] = np.array([""] * len(rows), dtype=object)
    batch["stage_seconds"] = np.zeros(len(rows))
    summary = write_batch(batch, str(tmp_path / "out"))
    errors = dict(zip(summary["shard"], (json.loads(text) for text in summary["shard_errors"]), strict=True))
    assert errors[str(paths[0])] == [] and errors[str(empty)] == []  # a corrupt image, an empty tar
    [message] = errors[str(tmp_path / "absent.tar")]
    assert "absent.tar" in message and "2 reads" in message
    assert all(np.isnan(summary["gpu_peak_bytes"]))


def test_edit_rows_carry_the_sample_columns_and_validate(tmp_path):
    """A stochastic sample's seed, group and diversity reach the edits table; a deterministic edit (as
    written before these columns existed) gets nulls."""
    import numpy as np

    from pipeline.stages.rows import EDIT_METRICS
    from pipeline.stages.write import rows_for_sample

    image = np.zeros((8, 8, 3), dtype=np.uint8)
    metrics = {name: 0.5 for name in EDIT_METRICS}
    common = {"target_class": "fox", "target_prompt": "a fox", "seed": 4, "edit_seconds": 0.1, **metrics}
    common["has_mask"] = False
    common |= {"params": json.dumps({"inversion": {"method": "null_text_vae"}}), "classified_as": None}
    common |= {"passed_filter": True, "filter_reason": None}
    sample = {"edit_id": "a", "sample_index": 2, "sample_seed": 14, "sample_group": "g", "diversity": 0.25}
    sample |= {"diversity_bound": 0.5}
    records = [{**common, **sample}, {**common, "edit_id": "b", "sample_index": 0}]  # the second: older
    batch = one_row_batch(image, records, np.stack([image, image]))
    edits, _, _ = rows_for_sample(batch, 0)
    validate_table("edits", to_table("edits", edits))
    first, second = edits
    assert (first["sample_seed"], first["sample_group"], first["sample_index"]) == (14, "g", 2)
    assert (first["diversity"], first["diversity_bound"]) == (0.25, 0.5)
    assert [second[name] for name in ("sample_seed", "sample_group", "diversity", "diversity_bound")] == [
        None
    ] * 4


def test_stored_inversions_are_written_per_sample_and_removed_with_their_shard(tmp_path):
    from pipeline.stages.write import write_inversions

    key, other = shard_key("s3://bucket/shard-000001.tar"), shard_key("s3://bucket/shard-000002.tar")
    first = write_inversions(str(tmp_path), key, "shard-000001.tar#a", [b"one", b"two"])
    again = write_inversions(str(tmp_path), key, "shard-000001.tar#a", [b"one", b"two"])
    assert first == again and len(set(first)) == 2  # a retried task rewrites the same names
    assert [(tmp_path / path).read_bytes() for path in first] == [b"one", b"two"]
    second = write_inversions(str(tmp_path), key, "shard-000001.tar#b", [b"three"])
    assert not set(second) & set(first)
    kept_elsewhere = write_inversions(str(tmp_path), other, "shard-000002.tar#a", [b"four"])
    assert write_inversions(str(tmp_path), key, "shard-000001.tar#c", []) == []

    # An interrupted shard's files go, except those recorded as durable; other shards' stay.
    assert remove_shard_files(str(tmp_path), key, keep=frozenset(first)) == 1
    assert not (tmp_path / second[0]).exists()
    assert all((tmp_path / path).exists() for path in first + kept_elsewhere)


def test_composite_image_is_written_only_for_composited_edits():
    """composite_image holds the composite's PNG and composite_* its metrics for a composited edit; both are
    null for an edit that was not (has_mask false)."""
    import io

    import numpy as np
    from PIL import Image

    from pipeline.stages.rows import COMPOSITE_PREFIX, EDIT_METRICS
    from pipeline.stages.write import rows_for_sample

    rng = np.random.default_rng(0)
    image, edit, composite = (rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8) for _ in range(3))
    common = {"target_class": "fox", "target_prompt": "a fox", "seed": 4, "edit_seconds": 0.1}
    common |= {name: 0.5 for name in EDIT_METRICS} | {"sample_index": 0, "classified_as": None}
    common |= {
        "params": json.dumps({"inversion": {"method": "ddim"}}),
        "passed_filter": True,
        "filter_reason": None,
    }
    composited = {**common, "edit_id": "a", "has_mask": True, "composited": True}
    composited |= {COMPOSITE_PREFIX + name: 0.25 for name in EDIT_METRICS}
    plain = {**common, "edit_id": "b", "has_mask": False, "composited": False}
    plain |= {COMPOSITE_PREFIX + name: None for name in EDIT_METRICS}
    off = {**plain, "edit_id": "c", "has_mask": True}  # a mask, but output.composite is off

    edits = np.stack([edit, edit, edit])
    batch = one_row_batch(
        image, [composited, plain, off], edits, composite_images=np.stack([composite, edit, edit])
    )
    first, second, third = rows_for_sample(batch, 0)[0]
    validate_table("edits", to_table("edits", [first, second, third]))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(first["composite_image"]))), composite)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(first["image"]))), edit)
    assert (first["has_mask"], first["composite_bg_psnr"]) == (True, 0.25)
    assert (second["has_mask"], second["composite_image"], second["composite_clip_t"]) == (False, None, None)
    assert (third["has_mask"], third["composite_image"]) == (True, None)
