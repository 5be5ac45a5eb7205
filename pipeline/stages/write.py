"""Write stage: turn processed sample rows into edits / sources / errors rows, validate them against
the schemas and write Parquet files named deterministically from the shard and the batch's samples.

Files: OUTPUT/edits/target_class=CLASS/{shard_key}.{digest}.parquet, OUTPUT/sources/..., OUTPUT/errors/...,
and with inversion.keep_artifacts OUTPUT/artifacts/{shard_key}/{source digest}-{k}.safetensors (the
sample's k-th stored inversion), written before the tables that name them.
A task retried on the same rows rewrites the same file names; files of a shard that never completed
are removed before the shard is processed again (`remove_shard_files`). Completion markers are
written by the driver (`pipeline.output.ShardTracker`) once all of a shard's rows have come back
from here.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import urllib.parse
from collections import defaultdict

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from pipeline.schemas import TABLES, load_schema, to_table
from pipeline.stages.rows import (
    CAPTION,
    COMPOSITE_IMAGES,
    COMPOSITE_PREFIX,
    EDIT_IMAGES,
    EDIT_METRICS,
    EDITS_JSON,
    FAILURES,
    GPU_PEAK_BYTES,
    IMAGE,
    INVERSION_STATES,
    INVERT_FAILED,
    INVERT_SECONDS,
    MODEL_FINGERPRINT,
    MODEL_ID,
    OK,
    ORIG_HEIGHT,
    ORIG_WIDTH,
    READ_FAILED,
    RECON,
    RECON_LPIPS,
    RECON_PSNR,
    RECON_SSIM,
    SHARD,
    SHARD_ROWS,
    SOURCE_CLASS,
    SOURCE_ID,
    STAGE_SECONDS,
    STATUS,
    decode_failures,
    is_shard_failure,
)
from pipeline.storage import write_bytes

COUNTS = ("rows", "read_failed", "sources", "ok", "failed", "edits", "passed", "errors")
TEXT_SUMMARY_COLUMNS = ("shard", "model_fingerprint", "files", "source_ids", "shard_errors")


def shard_key(shard: str) -> str:
    """A file-name-safe key, unique per shard URL: readable stem + hash."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", shard.rstrip("/").rsplit("/", 1)[-1].split(".")[0])[:40]
    return f"{stem}-{hashlib.sha256(shard.encode()).hexdigest()[:12]}"


def encode_png(image: np.ndarray) -> bytes:
    """uint8 (H, W, 3) -> PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG")
    return buffer.getvalue()


def _finite(value) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)


def edit_method(params: dict) -> str:
    """The method column of an edit: the editors' method, else the inversion method it was edited from."""
    return params.get("method") or params["inversion"]["method"]


def rows_for_sample(
    batch: dict, index: int, inversions: list[str] | None = None
) -> tuple[list[dict], list[dict], list[dict]]:
    """(edits rows, sources rows, errors rows) of one processed sample row.

    Args:
        batch: the processed batch.
        index: the row.
        inversions: the paths (relative to the output) of the row's stored inversions, or None.
    """
    source_id, status = str(batch[SOURCE_ID][index]), str(batch[STATUS][index])
    # A failed row's own failure leads its list (mark_failed); a row that failed reading has no other.
    errors = [
        {
            "source_id": source_id,
            "stage": failure.stage,
            "error_type": failure.error_type,
            "error": failure.message,
            "edit_id": failure.edit_id,
        }
        for failure in decode_failures(batch[FAILURES][index])
    ]
    if status == READ_FAILED:
        return [], [], errors
    model_id = str(batch[MODEL_ID][index])
    invert_seconds = _finite(batch[INVERT_SECONDS][index])
    edits = []
    if status == OK:
        size = batch[IMAGE][index].shape
        for position, record in enumerate(json.loads(batch[EDITS_JSON][index])):
            edits.append(
                {
                    "edit_id": record["edit_id"],
                    "source_id": source_id,
                    "source_class": batch[SOURCE_CLASS][index],
                    "target_class": record["target_class"],
                    "method": edit_method(json.loads(record["params"])),
                    "source_prompt": str(batch[CAPTION][index]),
                    "target_prompt": record["target_prompt"],
                    "seed": record["seed"],
                    "sample_index": record["sample_index"],
                    "sample_seed": record.get("sample_seed"),
                    "sample_group": record.get("sample_group"),
                    "params": record["params"],
                    "image": encode_png(batch[EDIT_IMAGES][index][position]),
                    "width": size[1],
                    "height": size[0],
                    "has_mask": bool(record["has_mask"]),
                    **{name: record[name] for name in EDIT_METRICS},
                    "composite_image": (
                        encode_png(batch[COMPOSITE_IMAGES][index][position])
                        if record.get("composited")
                        else None
                    ),
                    **{COMPOSITE_PREFIX + name: record.get(COMPOSITE_PREFIX + name) for name in EDIT_METRICS},
                    **{name: record.get(name) for name in ("diversity", "diversity_bound")},
                    "classified_as": record["classified_as"],
                    "passed_filter": record["passed_filter"],
                    "filter_reason": record["filter_reason"],
                    "invert_seconds": invert_seconds,
                    "edit_seconds": record["edit_seconds"],
                    "model_id": model_id,
                }
            )
    source = {
        "source_id": source_id,
        "status": status,
        "source_class": batch[SOURCE_CLASS][index],
        "caption": batch[CAPTION][index],
        "orig_width": int(batch[ORIG_WIDTH][index]),
        "orig_height": int(batch[ORIG_HEIGHT][index]),
        "image": encode_png(batch[IMAGE][index]),
        "reconstruction": None if status == INVERT_FAILED else encode_png(batch[RECON][index]),
        "recon_psnr": _finite(batch[RECON_PSNR][index]),
        "recon_ssim": _finite(batch[RECON_SSIM][index]),
        "recon_lpips": _finite(batch[RECON_LPIPS][index]),
        "inversions": inversions or None,
        "invert_seconds": invert_seconds,
        "edits": len(edits),
        "model_id": model_id,
    }
    return edits, [source], errors


def _write_parquet(fs, path: str, table: pa.Table) -> None:
    """Write the whole file in one go (`pipeline.storage`), so it is either complete or absent."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_bytes(fs, path, sink.getvalue().to_pybytes())


def write_tables(output: str, key: str, digest: str, tables: dict[str, list[dict]]) -> list[str]:
    """Validate and write one shard-batch's rows; returns the written paths (relative to output)."""
    fs, root = fsspec.core.url_to_fs(output)
    written = []
    for name in TABLES:
        rows = tables[name]
        if not rows:
            continue
        table = to_table(name, rows)
        partition_by = load_schema(name).partition_by
        if not partition_by:
            groups = {name: table}
        else:
            column = partition_by[0]
            groups = {}
            for value in sorted(set(table.column(column).to_pylist())):
                mask = pc.equal(table.column(column), value)
                folder = f"{name}/{column}={urllib.parse.quote(str(value), safe='')}"
                groups[folder] = table.filter(mask).drop_columns([column])
        for folder, part in groups.items():
            relative = f"{folder}/{key}.{digest}.parquet"
            _write_parquet(fs, f"{root}/{relative}", part)
            written.append(relative)
    return written


ARTIFACTS = "artifacts"


def write_inversions(output: str, key: str, source_id: str, states) -> list[str]:
    """Write one sample's stored inversions (safetensors bytes); returns their paths relative to output.

    File names depend only on the shard and the sample, so a retried task rewrites the same files.
    """
    if states is None or len(states) == 0:
        return []
    fs, root = fsspec.core.url_to_fs(output)
    stem = hashlib.sha256(source_id.encode()).hexdigest()[:16]
    written = []
    for position, state in enumerate(states):
        relative = f"{ARTIFACTS}/{key}/{stem}-{position}.safetensors"
        write_bytes(fs, f"{root}/{relative}", bytes(state))
        written.append(relative)
    return written


def _shard_errors(batch: dict, shard: str, indices: list[int]) -> list[str]:
    """The messages of the rows that stand for the shard failing as a whole (not complete)."""
    return [
        decode_failures(batch[FAILURES][i])[0].message
        for i in indices
        if is_shard_failure(str(batch[SOURCE_ID][i]), shard, batch[FAILURES][i])
    ]


def _peak(batch: dict, indices: list[int]) -> float:
    """The largest GPU memory peak reported by the rows' invert/edit actor; NaN without a GPU."""
    if GPU_PEAK_BYTES not in batch:
        return float("nan")
    values = np.asarray(batch[GPU_PEAK_BYTES][indices], dtype=np.float64)
    return float(np.nanmax(values)) if np.isfinite(values).any() else float("nan")


def write_batch(batch: dict, output: str) -> dict:
    """Ray Data map_batches function: write the batch's rows, return one summary row per shard.

    Returns:
        Columns shard, shard_rows, model_fingerprint, compute_seconds, files and source_ids (JSON lists),
        shard_errors (JSON list of the shard's own read failures: the shard is not complete),
        gpu_peak_bytes (NaN without a GPU) and the counts in COUNTS.
    """
    by_shard: dict[str, list[int]] = defaultdict(list)
    for index, shard in enumerate(batch[SHARD]):
        by_shard[str(shard)].append(index)
    summary: dict[str, list] = defaultdict(list)
    for shard, indices in by_shard.items():
        tables: dict[str, list[dict]] = {name: [] for name in TABLES}
        key, artifacts = shard_key(shard), []
        for index in indices:
            states = batch[INVERSION_STATES][index] if INVERSION_STATES in batch else None
            inversions = write_inversions(output, key, str(batch[SOURCE_ID][index]), states)
            artifacts += inversions
            edits, sources, errors = rows_for_sample(batch, index, inversions)
            tables["edits"] += edits
            tables["sources"] += sources
            tables["errors"] += errors
        digest = hashlib.sha256(
            "\n".join(sorted(str(batch[SOURCE_ID][i]) for i in indices)).encode()
        ).hexdigest()[:16]
        files = artifacts + write_tables(output, key, digest, tables)
        statuses = [str(batch[STATUS][i]) for i in indices]
        counts = {
            "rows": len(indices),
            "read_failed": statuses.count(READ_FAILED),
            "sources": len(tables["sources"]),
            "ok": statuses.count(OK),
            "failed": len(indices) - statuses.count(OK),
            "edits": len(tables["edits"]),
            "passed": sum(row["passed_filter"] for row in tables["edits"]),
            "errors": len(tables["errors"]),
        }
        summary["shard"].append(shard)
        summary["shard_rows"].append(int(batch[SHARD_ROWS][indices[0]]))
        fingerprints = [str(batch[MODEL_FINGERPRINT][i]) for i in indices if batch[MODEL_FINGERPRINT][i]]
        summary["model_fingerprint"].append(fingerprints[0] if fingerprints else "")
        summary["compute_seconds"].append(float(np.sum(batch[STAGE_SECONDS][indices])))
        summary["files"].append(json.dumps(files))
        summary["source_ids"].append(json.dumps([str(batch[SOURCE_ID][i]) for i in indices]))
        summary["shard_errors"].append(json.dumps(_shard_errors(batch, shard, indices)))
        summary["gpu_peak_bytes"].append(_peak(batch, indices))
        for name in COUNTS:
            summary[name].append(counts[name])
    return {
        name: np.array(values, dtype=object if name in TEXT_SUMMARY_COLUMNS else None)
        for name, values in summary.items()
    }


def remove_shard_files(output: str, key: str, keep: frozenset[str] = frozenset()) -> int:
    """Delete the table files and stored inversions of shard `key` left by an interrupted run, except `keep` (paths relative to
    the output: the files an earlier run cut short by a limit recorded as durable). Returns how many."""
    fs, root = fsspec.core.url_to_fs(output)
    removed = 0
    for name in TABLES:
        if not fs.exists(f"{root}/{name}"):
            continue
        for path in fs.find(f"{root}/{name}"):
            relative = path[len(root) :].lstrip("/")
            if path.rsplit("/", 1)[-1].startswith(f"{key}.") and relative not in keep:
                fs.rm(path)
                removed += 1
    if fs.exists(f"{root}/{ARTIFACTS}/{key}"):
        for path in fs.find(f"{root}/{ARTIFACTS}/{key}"):
            if path[len(root) :].lstrip("/") not in keep:
                fs.rm(path)
                removed += 1
    return removed
