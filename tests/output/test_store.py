"""The output folder's bookkeeping files: spec digest claims, atomic JSON records, completion markers."""

from __future__ import annotations

import pytest

from pipeline.errors import JobError
from pipeline.output import MARKERS, OutputStore


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
