"""Shard completion: a shard's marker is written once the writer has reported all of its rows."""

from __future__ import annotations

import json

from pipeline.output import MARKERS, OutputStore, ShardTracker
from pipeline.stages.write import COUNTS, shard_key

SHARD = "s3://bucket/shard-000000.tar"


def summary(rows: int, files: list[str], fingerprint: str = "", shard: str = SHARD) -> dict:
    """One writer summary of a 5-row shard: `rows` rows, each an ok source with one passing edit."""
    counts = {name: 0 for name in COUNTS} | {"rows": rows, "ok": rows, "sources": rows, "edits": rows}
    counts["passed"] = rows
    return {
        "shard": shard,
        "shard_rows": 5,
        "model_fingerprint": fingerprint,
        "compute_seconds": 0.5 * rows,
        "files": json.dumps(files),
        **counts,
    }


def test_marker_waits_for_every_row_of_the_shard(tmp_path):
    store = OutputStore(str(tmp_path))
    completed = []
    tracker = ShardTracker(store, completed.append)
    marker = tmp_path / MARKERS / f"{shard_key(SHARD)}.json"

    tracker.add(summary(3, ["edits/a.parquet"]))
    assert not marker.exists() and tracker.completed == [] and completed == []
    tracker.add(summary(2, ["edits/b.parquet"], fingerprint="f1"))
    record = json.loads(marker.read_text())
    assert record["rows"] == record["shard_rows"] == 5 and record["edits"] == record["passed"] == 5
    assert record["files"] == ["edits/a.parquet", "edits/b.parquet"]
    assert record["compute_seconds"] == 2.5 and record["failed"] == 0
    assert tracker.completed == completed == [SHARD]
    assert store.markers() == {SHARD: record}
    assert tracker.fingerprint == "f1"


def test_the_first_fingerprint_is_kept(tmp_path):
    tracker = ShardTracker(OutputStore(str(tmp_path)))
    tracker.add(summary(1, [], fingerprint="f1"))
    tracker.add(summary(1, [], fingerprint="f2", shard="other.tar"))
    assert tracker.fingerprint == "f1" and tracker.completed == []


def test_a_shard_that_could_not_be_read_whole_gets_no_marker(tmp_path):
    store = OutputStore(str(tmp_path))
    tracker = ShardTracker(store)
    failed = summary(5, ["errors/a.parquet"]) | {"shard_errors": json.dumps(["shard unreadable: timeout"])}
    tracker.add(failed)
    assert store.markers() == {} and tracker.completed == []
    assert tracker.failed == {SHARD: ["shard unreadable: timeout"]}
    assert store.partials() == {}  # read again whole by the next run


def test_a_shard_cut_short_resumes_from_its_partial_record(tmp_path):
    store = OutputStore(str(tmp_path))
    first = ShardTracker(store)
    first.add(summary(3, ["edits/a.parquet"]) | {"source_ids": json.dumps(["s#0", "s#1", "s#2"])})
    assert store.markers() == {}
    record = store.partials()[SHARD]
    assert record["rows"] == 3 and record["files"] == ["edits/a.parquet"]
    assert record["source_ids"] == ["s#0", "s#1", "s#2"]

    second = ShardTracker(store, resumed=store.partials())
    second.add(summary(2, ["edits/b.parquet"]) | {"source_ids": json.dumps(["s#3", "s#4"])})
    marker = store.markers()[SHARD]
    assert marker["rows"] == marker["shard_rows"] == 5 and marker["edits"] == 5
    assert marker["files"] == ["edits/a.parquet", "edits/b.parquet"]
    assert store.partials() == {} and second.completed == [SHARD]
    assert second.compute_seconds == 1.0  # this run's two rows only


def test_gpu_peak_is_the_largest_reported_and_none_without_a_gpu(tmp_path):
    tracker = ShardTracker(OutputStore(str(tmp_path)))
    tracker.add(summary(1, []) | {"gpu_peak_bytes": float("nan")})
    assert tracker.gpu_peak_bytes is None
    tracker.add(summary(1, []) | {"gpu_peak_bytes": 3e9})
    tracker.add(summary(1, []) | {"gpu_peak_bytes": 2e9})
    assert tracker.gpu_peak_bytes == 3e9
