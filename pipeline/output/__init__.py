"""A job's output folder beyond the tables: what the driver records about shards and the run.

OUTPUT/edits/, sources/, errors/   Parquet tables (written by `pipeline.stages.write`)
OUTPUT/_shards/_job.json           the spec digest the output belongs to (`OutputStore.claim`)
OUTPUT/_shards/{shard_key}.json    a shard's completion marker: all its rows are durable
                                   (`ShardTracker`)
OUTPUT/manifest.json               counts over completed shards, spec, versions, times
                                   (`write_manifest`)
"""

from pipeline.output.manifest import write_manifest
from pipeline.output.store import MARKERS, OutputStore
from pipeline.output.tracker import ShardTracker

__all__ = ["MARKERS", "OutputStore", "ShardTracker", "write_manifest"]
