"""The manifest: counts over every completed shard, this run's and earlier runs', and the run's record."""

from __future__ import annotations

import json

from pipeline.config import parse_config, spec_digest
from pipeline.output import MARKERS, OutputStore, ShardTracker, write_manifest
from pipeline.stages.write import COUNTS

SHARDS = ["s3://b/shard-000000.tar", "s3://b/shard-000001.tar", "s3://b/shard-000002.tar"]


def job(output: str):
    return parse_config(
        {
            "name": "manifest-test",
            "input": {"shards": SHARDS},
            "model": {"path": "tiny-sd"},
            "edits": [{"target_class": "fox"}],
            "metrics": {"classifier": "pkg.module:classifier"},
            "output": {"path": output},
        }
    )


def mark(store: OutputStore, name: str, shard: str, **counts) -> None:
    store.write_json(f"{MARKERS}/{name}.json", {"shard": shard, **dict.fromkeys(COUNTS, 0), **counts})


def test_counts_cover_earlier_runs_and_incomplete_shards_are_named(tmp_path):
    config = job(str(tmp_path))
    store = OutputStore(str(tmp_path))
    mark(
        store, "s0", SHARDS[0], rows=4, ok=3, failed=1, read_failed=1, sources=3, edits=6, passed=5, errors=1
    )
    tracker = ShardTracker(store)
    tracker.compute_seconds = 2.0
    tracker.fingerprint = "f1"
    mark(store, "s1", SHARDS[1], rows=2, ok=2, sources=2, edits=4, passed=1)

    manifest = write_manifest(config, store, SHARDS, tracker, started=1_000_000.0, skipped=1)
    assert manifest["counts"] == {
        "read": 6,
        "ok": 5,
        "failed": 1,
        "sources": 5,
        "edits": 10,
        "passed": 6,
        "errors": 1,
    }
    assert manifest["shards"] == {
        "total": 3,
        "complete": SHARDS[:2],
        "incomplete": SHARDS[2:],
        "failed": {},
        "skipped_as_complete": 1,
    }
    assert manifest["status"] == "partial" and manifest["gpu_memory_peak_bytes"] is None
    assert manifest["compute_seconds"] == 2.0 and manifest["model_fingerprint"] == "f1"
    assert manifest["spec_digest"] == spec_digest(config) and manifest["model_id"] == "tiny-sd"
    assert manifest["metrics_backbones"]["classifier"] == "pkg.module:classifier"
    assert manifest["started"] == "1970-01-12T13:46:40+00:00" and manifest["versions"]["python"]
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest


def test_a_run_with_nothing_to_do_keeps_the_recorded_fingerprint(tmp_path):
    config = job(str(tmp_path))
    store = OutputStore(str(tmp_path))
    first = ShardTracker(store)
    first.fingerprint = "f1"
    write_manifest(config, store, SHARDS, first, started=0.0, skipped=0)
    manifest = write_manifest(config, store, SHARDS, ShardTracker(store), started=0.0, skipped=3)
    assert manifest["model_fingerprint"] == "f1"


def test_counts_include_every_written_row_and_failed_shards_make_it_partial(tmp_path):
    config = job(str(tmp_path))
    store = OutputStore(str(tmp_path))
    mark(store, "s0", SHARDS[0], rows=4, ok=4, sources=4, edits=8, passed=8)
    tracker = ShardTracker(store)
    # This run: shard 1 was cut short by a limit after 2 rows, shard 2 could not be read whole.
    cut = {"shard": SHARDS[1], "shard_rows": 5, **dict.fromkeys(COUNTS, 0), "rows": 2, "ok": 2, "sources": 2}
    tracker.totals[SHARDS[1]] = cut | {"edits": 4, "passed": 3}
    tracker.totals[SHARDS[2]] = {"shard": SHARDS[2], **dict.fromkeys(COUNTS, 0), "rows": 3, "ok": 2}
    tracker.totals[SHARDS[2]] |= {"failed": 1, "read_failed": 1, "sources": 2, "edits": 4, "errors": 1}
    tracker.failed[SHARDS[2]] = ["shard unreadable after 2 samples"]

    manifest = write_manifest(config, store, SHARDS, tracker, started=0.0, skipped=1)
    assert manifest["counts"] == {
        "read": 4 + 2 + 3,
        "ok": 4 + 2 + 2,
        "failed": 1,
        "sources": 4 + 2 + 2,
        "edits": 8 + 4 + 4,
        "passed": 8 + 3,
        "errors": 1,
    }
    assert manifest["status"] == "partial"
    assert manifest["shards"]["failed"] == {SHARDS[2]: ["shard unreadable after 2 samples"]}
    assert manifest["shards"]["incomplete"] == SHARDS[1:]

    for index, shard in enumerate(SHARDS[1:], start=1):
        mark(store, f"s{index}", shard, rows=1)
    assert write_manifest(config, store, SHARDS, ShardTracker(store), 0.0, 3)["status"] == "complete"
