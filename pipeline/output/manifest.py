"""OUTPUT/manifest.json: the run's status, counts of every written row, failed shards, per-stage figures,
the spec, package versions and times."""

from __future__ import annotations

import json
import platform
import time
from datetime import datetime, timezone
from importlib import metadata

from pipeline.config import JobConfig, spec_digest, to_dict
from pipeline.metrics.backbones import backbone_names
from pipeline.output.store import MANIFEST, OutputStore
from pipeline.output.tracker import ShardTracker
from pipeline.stages.write import COUNTS

PACKAGES = (
    "inversa",
    "torch",
    "diffusers",
    "transformers",
    "open_clip_torch",
    "lpips",
    "ray",
    "pyarrow",
    "webdataset",
    "fsspec",
)


def versions() -> dict[str, str]:
    """Python's version and that of each package in PACKAGES ("not installed" when absent)."""
    found = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def written_counts(shards: list[str], markers: dict[str, dict], tracker: ShardTracker) -> dict[str, int]:
    """COUNTS summed over every row that is written: complete shards (this run's and earlier runs'),
    and the rows of this run's failed shards and of shards cut short by a limit."""
    records = [markers.get(shard) or tracker.totals.get(shard) for shard in shards]
    return {name: sum(record[name] for record in records if record) for name in COUNTS}


def write_manifest(
    config: JobConfig,
    store: OutputStore,
    shards: list[str],
    tracker: ShardTracker,
    started: float,
    skipped: int,
    stages: list[dict] | None = None,
) -> dict:
    """Status, counts of every written row, shards, per-stage throughput, spec, versions, times.

    Args:
        config: the job spec.
        store: the job's output.
        shards: every shard URL of the job.
        tracker: this run's shard tracker (compute time, model fingerprint, failed shards).
        started: when the run started (time.time()).
        skipped: shards skipped as complete by an earlier run.
        stages: per-stage execution figures of this run (`pipeline.dataflow.stage_figures`).

    Returns:
        The manifest, also written to OUTPUT/manifest.json. `status` is "complete" when every shard
        is complete, else "partial" (shards failed, or a limit left some for the next run).
    """
    markers = store.markers()
    previous = {}
    if store.fs.exists(store.path(MANIFEST)):
        previous = json.loads(store.fs.cat_file(store.path(MANIFEST)))
    counts = written_counts(shards, markers, tracker)
    complete = sorted(shard for shard in shards if shard in markers)
    ended = time.time()
    manifest = {
        "name": config.name,
        "status": "complete" if len(complete) == len(shards) else "partial",
        "spec": to_dict(config),
        "spec_digest": spec_digest(config),
        "versions": versions(),
        "model_id": config.model.path,
        "model_fingerprint": tracker.fingerprint or previous.get("model_fingerprint", ""),
        "metrics_backbones": backbone_names(config.metrics),
        "started": datetime.fromtimestamp(started, timezone.utc).isoformat(),
        "ended": datetime.fromtimestamp(ended, timezone.utc).isoformat(),
        "wall_seconds": ended - started,
        "compute_seconds": tracker.compute_seconds,
        "gpu_memory_peak_bytes": tracker.gpu_peak_bytes,
        "stages": stages or [],
        "counts": {
            "read": counts["rows"],
            "ok": counts["ok"],
            "failed": counts["failed"],
            "sources": counts["sources"],
            "edits": counts["edits"],
            "passed": counts["passed"],
            "errors": counts["errors"],
        },
        "shards": {
            "total": len(shards),
            "complete": complete,
            "incomplete": sorted(shard for shard in shards if shard not in markers),
            "failed": {shard: tracker.failed[shard] for shard in sorted(tracker.failed)},
            "skipped_as_complete": skipped,
        },
    }
    store.write_json(MANIFEST, manifest)
    return manifest
