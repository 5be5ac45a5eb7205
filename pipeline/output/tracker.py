"""Per-shard completion: the driver adds up the writer's summaries and marks shards whose rows are in."""

from __future__ import annotations

import json
from collections.abc import Callable

from pipeline.output.store import MARKERS, OutputStore
from pipeline.stages.write import COUNTS, shard_key


class ShardTracker:
    """Adds up the writer's per-shard summaries; writes a shard's marker when all its rows are in.

    Args:
        store: the output the markers are written to.
        on_complete: called with each shard URL whose marker was written.

    Attributes:
        totals: shard URL -> its summed record (the marker's content once complete).
        completed: shard URLs marked complete, in order.
        fingerprint: the model fingerprint of the first summary that carried one.
    """

    def __init__(self, store: OutputStore, on_complete: Callable[[str], None] | None = None):
        self.store = store
        self.totals: dict[str, dict] = {}
        self.completed: list[str] = []
        self.fingerprint = ""
        self.on_complete = on_complete

    def add(self, summary: dict) -> None:
        """Add one writer summary (a row of `pipeline.stages.write.write_batch`'s output)."""
        shard = summary["shard"]
        total = self.totals.setdefault(
            shard,
            {
                "shard": shard,
                "shard_rows": int(summary["shard_rows"]),
                "files": [],
                "compute_seconds": 0.0,
                **dict.fromkeys(COUNTS, 0),
            },
        )
        for name in COUNTS:
            total[name] += int(summary[name])
        total["compute_seconds"] += float(summary["compute_seconds"])
        total["files"] += json.loads(summary["files"])
        self.fingerprint = self.fingerprint or summary["model_fingerprint"]
        if total["rows"] == total["shard_rows"]:
            self.store.write_json(f"{MARKERS}/{shard_key(shard)}.json", total)
            self.completed.append(shard)
            if self.on_complete:
                self.on_complete(shard)
