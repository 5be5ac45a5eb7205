"""Reading WebDataset shards: grouping by key, own decoding (EXIF, modes), error rows, brace ranges."""

from __future__ import annotations

import io

import fsspec
import numpy as np
from job_data import good, image_bytes, job_shards, write_tar
from PIL import Image

from pipeline.config import InputFields, ReadRetry
from pipeline.stages.read import decode_image, expand_shards, read_shard
from pipeline.stages.rows import Failure, decode_failures, is_shard_failure


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
    rows = read_shard({"shard": str(tmp_path / "absent.tar")}, InputFields(), ReadRetry(backoff_seconds=0.0))
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


FAST_RETRY = ReadRetry(attempts=3, backoff_seconds=0.0)


class FlakyOpen:
    """fsspec.open that fails its first `failures` calls with a transient store error."""

    def __init__(self, failures: int):
        self.failures, self.calls = failures, 0
        self.open = fsspec.open  # the real one, before the test patches it

    def __call__(self, url, mode="rb"):
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionResetError(f"transient: connection reset reading {url}")
        return self.open(url, mode)


def test_a_transient_read_error_is_retried(tmp_path, monkeypatch):
    paths, _ = job_shards(tmp_path)
    clean = read_shard({"shard": str(paths[0])}, InputFields())
    flaky = FlakyOpen(failures=2)
    monkeypatch.setattr("pipeline.stages.read.fsspec.open", flaky)
    rows = read_shard({"shard": str(paths[0])}, InputFields(), FAST_RETRY)
    assert flaky.calls == 3
    assert [row["source_id"] for row in rows] == [row["source_id"] for row in clean]
    assert [row["status"] for row in rows] == [row["status"] for row in clean]


def test_a_shard_that_keeps_failing_is_read_attempts_times_then_marked_as_the_shards_failure(
    tmp_path, monkeypatch
):
    flaky = FlakyOpen(failures=10)
    monkeypatch.setattr("pipeline.stages.read.fsspec.open", flaky)
    waits = []
    monkeypatch.setattr("pipeline.stages.read.time.sleep", waits.append)
    shard = str(tmp_path / "shard.tar")
    rows = read_shard({"shard": shard}, InputFields(), ReadRetry(attempts=4, backoff_seconds=0.5))
    assert flaky.calls == 4 and waits == [0.5, 1.0, 2.0]  # doubling between reads, none after the last
    [row] = rows
    assert is_shard_failure(row["source_id"], shard, row["failures"])
    assert "4 reads" in read_failure(row).message


def test_shard_failures_are_told_apart_from_sample_failures(tmp_path):
    paths, _ = job_shards(tmp_path)
    truncated = read_shard({"shard": str(paths[2])}, InputFields(), FAST_RETRY)
    corrupt = read_shard({"shard": str(paths[0])}, InputFields(), FAST_RETRY)
    empty = write_tar(tmp_path / "empty.tar", [])
    empty_rows = read_shard({"shard": str(empty)}, InputFields(), FAST_RETRY)
    shard_failures = [
        row["source_id"]
        for row in truncated + corrupt + empty_rows
        if is_shard_failure(row["source_id"], row["shard"], row["failures"])
    ]
    # The truncated shard fails as a whole; a corrupt image or an empty tar does not fail its shard.
    assert shard_failures == [str(paths[2])]
    assert any(row["status"] == "error" for row in corrupt) and empty_rows[0]["status"] == "error"


def test_rows_written_by_an_earlier_run_are_left_out(tmp_path):
    paths, _ = job_shards(tmp_path)
    shard = str(paths[0])
    every = read_shard({"shard": shard}, InputFields())
    written = {shard: [every[0]["source_id"], every[2]["source_id"]]}
    rows = read_shard({"shard": shard}, InputFields(), written=written)
    assert [row["source_id"] for row in rows] == [every[1]["source_id"], every[3]["source_id"]]
    assert all(row["shard_rows"] == len(every) for row in rows)  # the shard's size is unchanged
