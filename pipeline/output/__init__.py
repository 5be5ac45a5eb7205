"""A job's output folder beyond the tables: what the driver records about shards and the run.

OUTPUT/edits/, sources/, errors/   Parquet tables (written by `pipeline.stages.write`)
OUTPUT/_shards/_job.json           the spec digest the output belongs to (`OutputStore.claim`)
OUTPUT/_shards/{shard_key}.json    a shard's completion marker: all its rows are durable
                                   (`ShardTracker`)
OUTPUT/_shards/_partial/{key}.json the rows of a shard that a limit cut short (resumed by a rerun)
OUTPUT/ray_data_stats.txt          Ray Data's execution stats of the last run
OUTPUT/manifest.json               status, counts of every row written, failed shards, per-stage
                                   throughput, spec, versions, times
                                   (`write_manifest`)
"""

from pipeline.output.manifest import write_manifest
from pipeline.output.store import MARKERS, PARTIAL, OutputStore
from pipeline.output.tracker import ShardTracker

__all__ = ["MARKERS", "PARTIAL", "OutputStore", "ShardTracker", "write_manifest"]
