"""Export a job's output for training: the edits that passed the filter, optionally mixed with the
original source images, as a Hugging Face `datasets` dataset (`save_to_disk`) or as WebDataset shards.

Every sample carries one image (the stored PNG bytes, unchanged) and one label: the target class for an
edit, the source class for an original. Samples are first staged into a local Arrow dataset (memory
mapped, so an export larger than memory works), put in id order, then shuffled with the seed; both
formats are written from that order, so an export is a function of the output's rows, the ratio and
the seed only. The output is read through fsspec and pyarrow, so OUTPUT and DEST may be s3:// URLs.

    DEST/  (datasets)    save_to_disk's files + export.json
    DEST/  (webdataset)  shard-000000.tar ... + export.json; a sample is KEY.png, KEY.cls (the label's
                         index in export.json's classes), KEY.json (id, kind, label name, source and
                         target class, source_id)
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds

from pipeline.schemas import load_schema

FORMATS = ("datasets", "webdataset")
EDIT, ORIGINAL = "edit", "original"
SUMMARY = "export.json"
SCAN_BATCH_ROWS = 256


class ExportError(ValueError):
    """An export that cannot be made as asked (empty, too few originals, destination not empty)."""


@dataclass(frozen=True)
class ExportPlan:
    """What an export holds, decided from the tables' small columns before any image is read.

    Attributes:
        edit_ids: the edits that passed the filter, sorted.
        original_ids: the source ids chosen as originals, sorted.
        classes: every label's class name, sorted; a label is its index here.
        counts: edits, edits_passed, sources, sources_with_class, originals.
    """

    edit_ids: tuple[str, ...]
    original_ids: tuple[str, ...]
    classes: tuple[str, ...]
    counts: dict[str, int]


def table_dataset(output: str, name: str) -> pds.Dataset | None:
    """A pyarrow dataset over table `name` of OUTPUT (None when the table has no files).

    Only finished `.parquet` files are read (a writer's `.tmp` files are not); the hive partition
    columns are typed from the schema, not guessed from folder names.
    """
    fs, root = fsspec.core.url_to_fs(output)
    folder = f"{root}/{name}"
    files = sorted(path for path in fs.find(folder) if path.endswith(".parquet")) if fs.exists(folder) else []
    if not files:
        return None
    table_schema = load_schema(name)
    partitioning = None
    if table_schema.partition_by:
        fields = [table_schema.schema.field(column) for column in table_schema.partition_by]
        partitioning = pds.partitioning(pa.schema(fields), flavor="hive")
    return pds.dataset(
        files,
        schema=table_schema.schema,
        filesystem=fs,
        format="parquet",
        partitioning=partitioning,
        partition_base_dir=folder,
    )


def _read_columns(output: str, name: str, columns: list[str]) -> pa.Table:
    dataset = table_dataset(output, name)
    if dataset is None:
        return pa.Table.from_pylist(
            [], schema=pa.schema([load_schema(name).schema.field(c) for c in columns])
        )
    return dataset.to_table(columns=columns)


def _refuse_duplicates(ids: list[str], what: str, output: str) -> None:
    if len(set(ids)) != len(ids):
        duplicated = sorted({value for value in ids if ids.count(value) > 1})
        raise ExportError(
            f"{output}: {what} {duplicated[:3]} appear more than once; validate the output first"
        )


def choose_originals(eligible: list[str], count: int, seed: int) -> list[str]:
    """`count` of the sorted `eligible` source ids, drawn without replacement with `seed`; sorted."""
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(eligible), size=count, replace=False)
    return sorted(eligible[index] for index in picked)


def plan_export(output: str, originals_ratio: float = 0.0, seed: int = 0) -> ExportPlan:
    """Decide which edits and originals an export holds.

    Args:
        output: the job's output URI.
        originals_ratio: originals per exported edit (originals:edits); round(ratio x passed edits)
            originals are drawn from the sources that have a class.
        seed: seeds the draw of originals (and the export's order).

    Raises:
        ExportError: no edit passed the filter, the ratio is negative, there are fewer sources with a
            class than originals asked for, or an id appears twice.
    """
    if originals_ratio < 0:
        raise ExportError(f"--originals-ratio must be >= 0, got {originals_ratio}")
    edits = _read_columns(output, "edits", ["edit_id", "target_class", "passed_filter"])
    passed = edits.filter(pc.field("passed_filter"))
    edit_ids = passed.column("edit_id").to_pylist()
    _refuse_duplicates(edits.column("edit_id").to_pylist(), "edit ids", output)
    if not edit_ids:
        raise ExportError(
            f"{output}: none of its {edits.num_rows} edits passed the filter; nothing to export "
            '(see `inversa query OUTPUT "select filter_reason, count(*) from edits group by 1"`)'
        )
    sources = _read_columns(output, "sources", ["source_id", "source_class"])
    _refuse_duplicates(sources.column("source_id").to_pylist(), "source ids", output)
    with_class = sources.filter(pc.field("source_class").is_valid())
    eligible = sorted(with_class.column("source_id").to_pylist())
    wanted = round(originals_ratio * len(edit_ids))
    if wanted > len(eligible):
        raise ExportError(
            f"--originals-ratio {originals_ratio} asks for {wanted} originals ({len(edit_ids)} passed edits) "
            f"but {output} holds {len(eligible)} sources with a class; use a ratio <= "
            f"{len(eligible) / len(edit_ids):.4g}"
        )
    original_ids = choose_originals(eligible, wanted, seed)
    source_class = dict(
        zip(*with_class.select(["source_id", "source_class"]).to_pydict().values(), strict=True)
    )
    classes = set(passed.column("target_class").to_pylist()) | {source_class[i] for i in original_ids}
    counts = {
        "edits": edits.num_rows,
        "edits_passed": len(edit_ids),
        "sources": sources.num_rows,
        "sources_with_class": len(eligible),
        "originals": len(original_ids),
    }
    return ExportPlan(tuple(sorted(edit_ids)), tuple(original_ids), tuple(sorted(classes)), counts)


def _scan(dataset: pds.Dataset | None, columns: list[str], keep: pc.Expression) -> Iterator[dict]:
    if dataset is None:
        return
    for batch in dataset.to_batches(columns=columns, filter=keep, batch_size=SCAN_BATCH_ROWS):
        yield from batch.to_pylist()


def iter_samples(output: str, plan: ExportPlan) -> Iterator[dict]:
    """The plan's samples with their image bytes, read one Parquet batch at a time.

    Raises:
        ExportError: the tables no longer hold exactly the planned rows (the output changed meanwhile).
    """
    label = {name: index for index, name in enumerate(plan.classes)}
    seen = 0
    edit_columns = ["edit_id", "source_id", "source_class", "target_class", "image"]
    for row in _scan(table_dataset(output, "edits"), edit_columns, pc.field("passed_filter")):
        seen += 1
        yield {
            "id": row["edit_id"],
            "kind": EDIT,
            "image": {"bytes": row["image"], "path": None},
            "label": label[row["target_class"]],
            "source_id": row["source_id"],
            "source_class": row["source_class"],
            "target_class": row["target_class"],
        }
    chosen = pc.field("source_id").isin(pa.array(plan.original_ids, pa.string()))
    source_columns = ["source_id", "source_class", "image"]
    for row in _scan(table_dataset(output, "sources"), source_columns, chosen) if plan.original_ids else ():
        seen += 1
        yield {
            "id": row["source_id"],
            "kind": ORIGINAL,
            "image": {"bytes": row["image"], "path": None},
            "label": label[row["source_class"]],
            "source_id": row["source_id"],
            "source_class": row["source_class"],
            "target_class": None,
        }
    planned = len(plan.edit_ids) + len(plan.original_ids)
    if seen != planned:
        raise ExportError(f"{output} changed during the export: planned {planned} samples, read {seen}")


def _features(classes: tuple[str, ...]):
    import datasets

    return datasets.Features(
        {
            "id": datasets.Value("string"),
            "kind": datasets.Value("string"),
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=list(classes)),
            "source_id": datasets.Value("string"),
            "source_class": datasets.Value("string"),
            "target_class": datasets.Value("string"),
        }
    )


def _generate(output: str, plan: dict) -> Iterator[dict]:
    # A module-level generator over plain data, so `datasets` can fingerprint its arguments.
    yield from iter_samples(output, ExportPlan(**plan))


def stage(output: str, plan: ExportPlan, seed: int, cache_dir: str):
    """The plan's samples as a memory-mapped `datasets.Dataset` in id order, shuffled with `seed`."""
    import datasets

    staged = datasets.Dataset.from_generator(
        _generate,
        features=_features(plan.classes),
        gen_kwargs={"output": output, "plan": asdict(plan)},
        cache_dir=cache_dir,
    )
    return staged.sort(["kind", "id"]).shuffle(seed=seed)


def wds_key(sample: dict) -> str:
    """A sample's WebDataset key: the edit id, or `original-` + a hash of the source id (source ids
    hold the dots and slashes that WebDataset reads as extension and folder separators)."""
    if sample["kind"] == EDIT:
        return sample["id"]
    return f"original-{hashlib.sha256(sample['id'].encode()).hexdigest()[:32]}"


def write_webdataset(staged, destination: str, classes: tuple[str, ...], shard_size: int) -> list[str]:
    """Write `staged` in its order as tar shards of `shard_size` samples; returns the shard names."""
    import datasets
    import webdataset as wds

    fs, root = fsspec.core.url_to_fs(destination)
    fs.makedirs(root, exist_ok=True)
    raw = staged.cast_column("image", datasets.Image(decode=False))
    names = []
    for index, start in enumerate(range(0, len(raw), shard_size)):
        name = f"shard-{index:06d}.tar"
        # mtime 0: the same export writes the same bytes.
        with fs.open(f"{root}/{name}", "wb") as handle, wds.TarWriter(handle, mtime=0) as writer:
            for sample in raw.select(range(start, min(start + shard_size, len(raw)))):
                metadata = {
                    key: sample[key] for key in ("id", "kind", "source_id", "source_class", "target_class")
                }
                writer.write(
                    {
                        "__key__": wds_key(sample),
                        "png": sample["image"]["bytes"],
                        "cls": str(sample["label"]),
                        "json": {**metadata, "label": classes[sample["label"]]},
                    }
                )
        names.append(name)
    return names


def _refuse_non_empty(destination: str, overwrite: bool) -> None:
    fs, root = fsspec.core.url_to_fs(destination)
    if fs.exists(root) and (not fs.isdir(root) or fs.ls(root)):
        if not overwrite:
            raise ExportError(
                f"{destination} exists and is not empty; pass --overwrite or choose another DEST"
            )
        fs.rm(root, recursive=True)


def export_output(
    output: str,
    destination: str,
    fmt: str,
    originals_ratio: float = 0.0,
    seed: int = 0,
    shard_size: int = 1000,
    overwrite: bool = False,
) -> dict:
    """Export OUTPUT's passed edits (and originals at `originals_ratio`) to DEST in format `fmt`.

    Args:
        output: the job's output URI.
        destination: the folder (URI) to write; must be empty or absent unless `overwrite`.
        fmt: "datasets" (save_to_disk) or "webdataset" (tar shards).
        originals_ratio: originals:edits (see `plan_export`).
        seed: seeds the choice of originals and the order of the samples.
        shard_size: samples per WebDataset shard / per `datasets` Arrow file.
        overwrite: delete DEST first.

    Returns:
        The summary also written to DEST/export.json: format, seed, ratio, classes, counts, shards.

    Raises:
        ExportError: see `plan_export`; an unknown format; a shard size below 1; DEST not empty.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    if shard_size < 1:
        raise ExportError(f"--shard-size must be >= 1, got {shard_size}")
    plan = plan_export(output, originals_ratio, seed)
    _refuse_non_empty(destination, overwrite)
    with tempfile.TemporaryDirectory(prefix="inversa-export-") as cache_dir:
        staged = stage(output, plan, seed, cache_dir)
        if fmt == "datasets":
            staged.save_to_disk(destination, num_shards=math.ceil(len(staged) / shard_size))
            shards = None
        else:
            shards = write_webdataset(staged, destination, plan.classes, shard_size)
    summary = {
        "source": output,
        "format": fmt,
        "seed": seed,
        "originals_ratio": originals_ratio,
        "shard_size": shard_size,
        "classes": list(plan.classes),
        "counts": {**plan.counts, "samples": len(plan.edit_ids) + len(plan.original_ids)},
        "shards": shards,
    }
    fs, root = fsspec.core.url_to_fs(destination)
    with fs.open(f"{root}/{SUMMARY}", "w") as handle:
        json.dump(summary, handle, indent=2)
    return summary
