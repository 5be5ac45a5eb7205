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
    tracker.totals[SHARDS[1]] = {"compute_seconds": 2.0}
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
        "skipped_as_complete": 1,
    }
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
