"""Reading WebDataset shards: grouping by key, own decoding (EXIF, modes), error rows, brace ranges."""

from __future__ import annotations

import io

import numpy as np
from job_data import good, image_bytes, job_shards, write_tar
from PIL import Image

from pipeline.config import InputFields
from pipeline.stages.read import decode_image, expand_shards, read_shard
from pipeline.stages.rows import Failure, decode_failures


def read_failure(row: dict) -> Failure:
    """The one failure of a row that failed reading."""
    [failure] = decode_failures(row["failures"])
    assert failure.stage == "read" and failure.edit_id is None
    return failure


def test_expand_shards_brace_ranges_keep_order():
    urls = expand_shards(
        ["s3://b/shard-{000000..000002}.tar", "gs://c/x-{a,b}.tar", "s3://b/shard-000001.tar"]
    )
    assert urls == [
        "s3://b/shard-000000.tar",
        "s3://b/shard-000001.tar",
        "s3://b/shard-000002.tar",
        "gs://c/x-a.tar",
        "gs://c/x-b.tar",
    ]


def test_rows_match_what_was_written(tmp_path):
    paths, samples = job_shards(tmp_path)
    for path in paths:
        rows = read_shard({"shard": str(path)}, InputFields())
        written = samples[path.name]
        assert all(row["shard_rows"] == len(rows) for row in rows)
        ok = {row["source_id"]: row for row in rows if row["status"] == "ok"}
        errors = [row for row in rows if row["status"] == "error"]
        assert sorted(ok) == sorted(f"{path}#{s.key}" for s in written if s.bad is None)
        assert sorted(read_failure(row).error_type for row in errors) == sorted(
            s.bad for s in written if s.bad
        )
        for sample in written:
            if sample.bad is None:
                row = ok[f"{path}#{sample.key}"]
                assert row["source_class"] == sample.source_class
                assert row["caption"] == sample.members["txt"].decode()
                assert row["image"].dtype == np.uint8 and row["image"].shape[2] == 3


def test_truncated_tar_keeps_samples_before_the_damage(tmp_path):
    paths, samples = job_shards(tmp_path)
    rows = read_shard({"shard": str(paths[2])}, InputFields())
    assert [row["status"] for row in rows] == ["ok", "ok", "error"]
    assert rows[-1]["source_id"] == str(paths[2]) and read_failure(rows[-1]).error_type == "TruncatedTar"


def test_missing_shard_and_empty_shard_give_one_error_row(tmp_path):
    rows = read_shard({"shard": str(tmp_path / "absent.tar")}, InputFields())
    assert len(rows) == 1 and rows[0]["status"] == "error" and rows[0]["shard_rows"] == 1
    empty = write_tar(tmp_path / "empty.tar", [])
    rows = read_shard({"shard": str(empty)}, InputFields())
    assert [read_failure(row).error_type for row in rows] == ["EmptyShard"]


def test_exif_orientation_is_applied():
    raw = image_bytes(11, size=(40, 24), fmt="PNG")
    pixels = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
    rotated = image_bytes(11, size=(40, 24), fmt="PNG", exif_orientation=6)
    decoded = decode_image(rotated, "x.png")
    # Orientation 6: the stored image must be rotated 90 degrees clockwise to display upright.
    np.testing.assert_array_equal(decoded, np.rot90(pixels, k=-1))


def test_modes_become_rgb():
    gray = decode_image(image_bytes(3, mode="L"), "g.png")
    assert gray.shape[2] == 3 and (gray[..., 0] == gray[..., 1]).all()
    transparent = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    buffer = io.BytesIO()
    transparent.save(buffer, format="PNG")
    np.testing.assert_array_equal(decode_image(buffer.getvalue(), "t.png"), np.full((4, 4, 3), 255))


def test_class_from_json_field(tmp_path):
    sample = good("k/a", "cat", 1)
    sample.members["json"] = b'{"label": "tiger", "color": "red"}'
    path = write_tar(tmp_path / "j.tar", [sample])
    rows = read_shard({"shard": str(path)}, InputFields(class_="json.label"))
    assert rows[0]["source_class"] == "tiger"
    rows = read_shard({"shard": str(path)}, InputFields(class_="json.missing"))
    assert rows[0]["status"] == "error" and "missing" in read_failure(rows[0]).message
