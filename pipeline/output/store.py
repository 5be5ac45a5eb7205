"""The output folder's bookkeeping files: the spec digest, completion markers and JSON records."""

from __future__ import annotations

import json

import fsspec

from pipeline.errors import JobError
from pipeline.storage import write_bytes

MARKERS = "_shards"
PARTIAL = "_partial"  # inside MARKERS: records of shards cut short by a limit
MANIFEST = "manifest.json"


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

    def is_inversa_output(self) -> bool:
        """Whether the folder holds an inversa output: its manifest, its spec claim or its markers."""
        return any(self.fs.exists(self.path(name)) for name in (MANIFEST, f"{MARKERS}/_job.json", MARKERS))

    def reset(self) -> None:
        """Delete the whole output, which must be an inversa output (or an empty or absent folder).

        Raises:
            JobError: the folder holds something else; nothing is deleted.
        """
        if not self.fs.exists(self.root):
            return
        if not self.is_inversa_output():
            if not self.fs.isdir(self.root) or self.fs.ls(self.root, detail=False):
                raise JobError(
                    f"--overwrite refused: {self.output} is not an inversa output (no {MANIFEST}, "
                    f"{MARKERS}/ or {MARKERS}/_job.json) and is not empty; nothing was deleted. "
                    "Choose another --output, or remove the folder yourself"
                )
            return
        self.fs.rm(self.root, recursive=True)

    def remove(self, relative: str) -> None:
        """Delete one bookkeeping file if it exists."""
        if self.fs.exists(self.path(relative)):
            self.fs.rm(self.path(relative))

    def partials(self) -> dict[str, dict]:
        """shard URL -> the record of a shard an earlier run cut short (rows durable so far).

        A record that holds the shard's own read failure is left out: such a shard is read again whole.
        """
        folder = self.path(f"{MARKERS}/{PARTIAL}")
        if not self.fs.exists(folder):
            return {}
        records = {}
        for path in self.fs.ls(folder, detail=False):
            if path.endswith(".json"):
                record = json.loads(self.fs.cat_file(path))
                if not record.get("shard_errors"):
                    records[record["shard"]] = record
        return records

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

    def write_text(self, relative: str, text: str) -> None:
        """Write a text file through a temporary name, so the file is either whole or absent."""
        path = self.path(relative)
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with self.fs.open(f"{path}.tmp", "w") as handle:
            handle.write(text)
        self.fs.mv(f"{path}.tmp", path)

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
