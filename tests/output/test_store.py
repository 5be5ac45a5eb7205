"""The output folder's bookkeeping files: spec digest claims, atomic JSON records, completion markers."""

from __future__ import annotations

import pytest

from pipeline.errors import JobError
from pipeline.output import MARKERS, PARTIAL, OutputStore


def test_an_output_belongs_to_the_spec_that_claimed_it_first(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    store.claim("a" * 64)
    store.claim("a" * 64)  # a rerun of the same spec resumes
    with pytest.raises(JobError, match="different job spec.*--overwrite"):
        store.claim("b" * 64)
    store.reset()
    assert not (tmp_path / "out").exists()
    store.claim("b" * 64)


def test_markers_are_the_shard_records_only(tmp_path):
    store = OutputStore(str(tmp_path))
    store.claim("a" * 64)
    assert store.markers() == {}
    store.write_json(f"{MARKERS}/s0.json", {"shard": "s3://b/s0.tar", "rows": 4})
    store.write_json(f"{MARKERS}/s1.json", {"shard": "s3://b/s1.tar", "rows": 2})
    (tmp_path / MARKERS / "s2.json.tmp").write_text("{")  # a write cut short
    assert store.markers() == {
        "s3://b/s0.tar": {"shard": "s3://b/s0.tar", "rows": 4},
        "s3://b/s1.tar": {"shard": "s3://b/s1.tar", "rows": 2},
    }
    assert sorted(path.name for path in (tmp_path / MARKERS).iterdir()) == [
        "_job.json",
        "s0.json",
        "s1.json",
        "s2.json.tmp",
    ]


def test_overwrite_deletes_only_an_inversa_output(tmp_path):
    own = tmp_path / "mine"
    own.mkdir()
    (own / "notes.txt").write_text("a person's own file")
    with pytest.raises(JobError, match=f"{own}.*not an inversa output.*nothing was deleted"):
        OutputStore(str(own)).reset()
    assert (own / "notes.txt").read_text() == "a person's own file"

    empty = tmp_path / "empty"
    empty.mkdir()
    OutputStore(str(empty)).reset()  # nothing to lose: allowed, kept
    OutputStore(str(tmp_path / "absent")).reset()

    output = tmp_path / "out"
    store = OutputStore(str(output))
    store.claim("a" * 64)
    (output / "edits").mkdir()
    (output / "edits" / "x.parquet").write_bytes(b"rows")
    assert store.is_inversa_output()
    store.reset()
    assert not output.exists()


def test_partial_records_skip_shards_that_failed_to_read(tmp_path):
    store = OutputStore(str(tmp_path))
    store.write_json(f"{MARKERS}/{PARTIAL}/a.json", {"shard": "a.tar", "rows": 2, "shard_errors": []})
    store.write_json(f"{MARKERS}/{PARTIAL}/b.json", {"shard": "b.tar", "rows": 1, "shard_errors": ["gone"]})
    assert list(store.partials()) == ["a.tar"]
    assert store.markers() == {}  # partial records are not completion markers
