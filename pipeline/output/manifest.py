"""OUTPUT/manifest.json: counts over every completed shard, the spec, package versions and times."""

from __future__ import annotations

import json
import platform
import time
from datetime import datetime, timezone
from importlib import metadata

from pipeline.config import JobConfig, spec_digest, to_dict
from pipeline.metrics.backbones import backbone_names
from pipeline.output.store import OutputStore
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


def write_manifest(
    config: JobConfig,
    store: OutputStore,
    shards: list[str],
    tracker: ShardTracker,
    started: float,
    skipped: int,
) -> dict:
    """Counts over every completed shard (this run's and earlier runs'), spec, versions, times.

    Args:
        config: the job spec.
        store: the job's output.
        shards: every shard URL of the job.
        tracker: this run's shard tracker (compute time, model fingerprint).
        started: when the run started (time.time()).
        skipped: shards skipped as complete by an earlier run.

    Returns:
        The manifest, also written to OUTPUT/manifest.json.
    """
    markers = store.markers()
    previous = {}
    if store.fs.exists(store.path("manifest.json")):
        previous = json.loads(store.fs.cat_file(store.path("manifest.json")))
    counts = {name: sum(markers[shard][name] for shard in markers) for name in COUNTS}
    ended = time.time()
    manifest = {
        "name": config.name,
        "spec": to_dict(config),
        "spec_digest": spec_digest(config),
        "versions": versions(),
        "model_id": config.model.path,
        "model_fingerprint": tracker.fingerprint or previous.get("model_fingerprint", ""),
        "metrics_backbones": backbone_names(config.metrics),
        "started": datetime.fromtimestamp(started, timezone.utc).isoformat(),
        "ended": datetime.fromtimestamp(ended, timezone.utc).isoformat(),
        "wall_seconds": ended - started,
        "compute_seconds": sum(total["compute_seconds"] for total in tracker.totals.values()),
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
            "complete": sorted(shard for shard in shards if shard in markers),
            "incomplete": sorted(shard for shard in shards if shard not in markers),
            "skipped_as_complete": skipped,
        },
    }
    store.write_json("manifest.json", manifest)
    return manifest
