"""The output folder's bookkeeping files: the spec digest, completion markers and JSON records."""

from __future__ import annotations

import json

import fsspec

from pipeline.errors import JobError
from pipeline.storage import write_bytes

MARKERS = "_shards"


class OutputStore:
    """The output folder's bookkeeping: spec digest, completion markers, manifest.

    Args:
        output: the output URI (local folder, file://, s3://, gs://).
    """

    def __init__(self, output: str):
        self.output = output
        self.fs, self.root = fsspec.core.url_to_fs(output)

    def path(self, relative: str) -> str:
        """The filesystem path of `relative` inside the output."""
        return f"{self.root}/{relative}"

    def reset(self) -> None:
        """Delete the whole output."""
        if self.fs.exists(self.root):
            self.fs.rm(self.root, recursive=True)

    def claim(self, digest: str) -> None:
        """Record the spec digest, or refuse an output written by a different spec.

        Raises:
            JobError: the output holds rows of a spec with another digest.
        """
        path = self.path(f"{MARKERS}/_job.json")
        if self.fs.exists(path):
            recorded = json.loads(self.fs.cat_file(path))["spec_digest"]
            if recorded != digest:
                raise JobError(
                    f"output {self.output} holds rows of a different job spec (digest {recorded[:12]} != {digest[:12]}); "
                    "pass --overwrite to start afresh or choose another --output"
                )
            return
        self.write_json(f"{MARKERS}/_job.json", {"spec_digest": digest})

    def write_json(self, relative: str, data: dict) -> None:
        """Write `data` to `relative` whole (`pipeline.storage`): readers never see part of it."""
        write_bytes(self.fs, self.path(relative), json.dumps(data, indent=2, sort_keys=True).encode())

    def markers(self) -> dict[str, dict]:
        """shard URL -> its completion record."""
        folder = self.path(MARKERS)
        if not self.fs.exists(folder):
            return {}
        records = {}
        # refresh: fsspec shares filesystem instances, and a cached listing misses other processes' markers.
        for path in self.fs.ls(folder, detail=False, refresh=True):
            name = path.rsplit("/", 1)[-1]
            if name.endswith(".json") and not name.startswith("_"):
                record = json.loads(self.fs.cat_file(path))
                records[record["shard"]] = record
        return records
