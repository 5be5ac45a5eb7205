"""Per-shard completion: the driver adds up the writer's summaries and marks shards whose rows are in.

A shard ends one of three ways in a run: complete (all its rows durable, none of them the shard's own
read failure: a marker is written), failed (all its rows are in but the shard could not be read whole:
no marker, recorded in `failed`, read again by the next run), or cut short by a limit (a partial record
lists the rows that are durable, and the next run reads only the rest).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable

from pipeline.output.store import MARKERS, PARTIAL, OutputStore
from pipeline.stages.write import COUNTS, shard_key


def empty_total(shard: str, shard_rows: int) -> dict:
    """A shard's record before any summary: no rows, no files."""
    return {
        "shard": shard,
        "shard_rows": shard_rows,
        "files": [],
        "source_ids": [],
        "shard_errors": [],
        "compute_seconds": 0.0,
        **dict.fromkeys(COUNTS, 0),
    }


class ShardTracker:
    """Adds up the writer's per-shard summaries; writes a shard's marker when all its rows are in.

    Args:
        store: the output the markers are written to.
        on_complete: called with each shard URL whose marker was written.
        resumed: shard URL -> partial record of an earlier run cut short (`OutputStore.partials`);
            its rows count as in.

    Attributes:
        totals: shard URL -> its summed record (the marker's content once complete).
        completed: shard URLs marked complete, in order.
        failed: shard URL -> the messages of its read failures (all rows in, not complete).
        fingerprint: the model fingerprint of the first summary that carried one.
        gpu_peak_bytes: the largest GPU memory peak the invert/edit actors reported; None without a GPU.
        compute_seconds: in-actor compute time of this run's summaries.
    """

    def __init__(
        self,
        store: OutputStore,
        on_complete: Callable[[str], None] | None = None,
        resumed: dict[str, dict] | None = None,
    ):
        self.store = store
        self.totals: dict[str, dict] = {shard: dict(record) for shard, record in (resumed or {}).items()}
        self.completed: list[str] = []
        self.failed: dict[str, list[str]] = {}
        self.fingerprint = ""
        self.gpu_peak_bytes: float | None = None
        self.compute_seconds = 0.0
        self.on_complete = on_complete

    def add(self, summary: dict) -> None:
        """Add one writer summary (a row of `pipeline.stages.write.write_batch`'s output)."""
        shard = summary["shard"]
        total = self.totals.setdefault(shard, empty_total(shard, int(summary["shard_rows"])))
        for name in COUNTS:
            total[name] += int(summary[name])
        total["compute_seconds"] += float(summary["compute_seconds"])
        self.compute_seconds += float(summary["compute_seconds"])
        total["files"] += json.loads(summary["files"])
        total["source_ids"] += json.loads(summary.get("source_ids", "[]"))
        total["shard_errors"] += json.loads(summary.get("shard_errors", "[]"))
        self.fingerprint = self.fingerprint or summary["model_fingerprint"]
        peak = float(summary.get("gpu_peak_bytes", math.nan))
        if not math.isnan(peak):
            self.gpu_peak_bytes = max(peak, self.gpu_peak_bytes or 0.0)
        key = shard_key(shard)
        if total["rows"] < total["shard_rows"]:
            self.store.write_json(f"{MARKERS}/{PARTIAL}/{key}.json", total)
            return
        self.store.remove(f"{MARKERS}/{PARTIAL}/{key}.json")
        if total["shard_errors"]:
            self.failed[shard] = total["shard_errors"]
            return
        marker = {name: value for name, value in total.items() if name not in ("source_ids", "shard_errors")}
        self.store.write_json(f"{MARKERS}/{key}.json", marker)
        self.completed.append(shard)
        if self.on_complete:
            self.on_complete(shard)
