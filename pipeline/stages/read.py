"""Read WebDataset shards: group tar members into samples, decode images ourselves, emit error rows.

A sample is the run of consecutive tar members sharing a key (the member path up to the first dot of
its file name, as in webdataset). Every sample becomes one row: either `status="ok"` with the decoded
RGB image, caption and class, or `status="error"` with its read failure (`pipeline.stages.rows`). A
shard that cannot be opened or ends early (truncated tar) adds one error row whose source_id is the
shard URL; the samples read before the damage are kept. Such a shard is read again a few times first
(`input.retry`), and if it still fails it is recorded as failed, not complete, so a rerun reads it
again. One bad sample never fails a shard or the job.

Every row of a shard carries `shard_rows`, the number of rows that shard produced: the writer uses it
to know when all of a shard's rows are durable.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
import time
from collections.abc import Iterator

import braceexpand
import fsspec
import numpy as np
from PIL import Image, ImageOps

from pipeline.config import InputFields, ReadRetry
from pipeline.stages.rows import (
    CAPTION,
    EMPTY_SHARD,
    FAILURES,
    IMAGE,
    META,
    NO_FAILURES,
    OK,
    SHARD,
    SHARD_ROWS,
    SOURCE_CLASS,
    SOURCE_ID,
    STAGE_SECONDS,
    STATUS,
    Failure,
    mark_failed,
)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_KEY_AND_EXTENSION = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
EMPTY_IMAGE = np.zeros((0, 0, 3), dtype=np.uint8)


class SampleError(ValueError):
    """A sample that cannot be used; `kind` is the error_type written to the errors table."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def expand_shards(patterns: tuple[str, ...] | list[str]) -> list[str]:
    """Expand brace ranges (`shard-{000000..000127}.tar`) in every pattern, keeping order, no repeats."""
    urls: list[str] = []
    for pattern in patterns:
        for url in braceexpand.braceexpand(pattern):
            if url not in urls:
                urls.append(url)
    return urls


def decode_image(data: bytes, name: str) -> np.ndarray:
    """Decode jpg/jpeg/png/webp bytes to RGB, applying EXIF orientation.

    Returns:
        uint8 array (H, W, 3).

    Raises:
        SampleError: CorruptImage when the bytes are not a decodable image.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
            if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                # Composite transparency on white rather than letting convert() drop alpha to black.
                rgba = image.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                image = Image.alpha_composite(background, rgba)
            return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    except Exception as error:  # PIL raises many types for bad bytes
        raise SampleError("CorruptImage", f"member {name}: cannot decode image: {error}") from error


def _text(members: dict[str, bytes], extension: str, key: str) -> str:
    if extension not in members:
        raise SampleError("MissingField", f"sample {key} has no .{extension} member (have {sorted(members)})")
    try:
        return members[extension].decode("utf-8").strip()
    except UnicodeDecodeError as error:
        raise SampleError("BadText", f"member {key}.{extension} is not UTF-8: {error}") from error


def _read_class(members: dict[str, bytes], spec: str, key: str) -> str:
    extension, _, json_key = spec.partition(".")
    text = _text(members, extension, key)
    if not json_key:
        return text
    try:
        value = json.loads(text)[json_key]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise SampleError("MissingField", f"member {key}.{extension} has no JSON key {json_key!r}") from error
    return str(value)


def parse_sample(key: str, members: dict[str, bytes], fields: InputFields) -> dict:
    """Decode one sample's members into image, caption, class and meta.

    Raises:
        SampleError: MissingField, CorruptImage or BadText.
    """
    image_extension = next((ext for ext in fields.image if ext in members), None)
    if image_extension is None:
        raise SampleError(
            "MissingField",
            f"sample {key} has no image member (looked for {list(fields.image)}, have {sorted(members)})",
        )
    if image_extension.lower() not in IMAGE_EXTENSIONS:
        raise SampleError(
            "UnsupportedImage", f"member {key}.{image_extension}: decodable types are {IMAGE_EXTENSIONS}"
        )
    image = decode_image(members[image_extension], f"{key}.{image_extension}")
    caption = _text(members, fields.caption, key)
    if not caption:
        raise SampleError("MissingField", f"sample {key}: caption .{fields.caption} is empty")
    meta = "{}"
    if fields.meta and fields.meta in members:
        try:
            meta = json.dumps(json.loads(members[fields.meta].decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise SampleError("BadMeta", f"member {key}.{fields.meta} is not JSON: {error}") from error
    return {
        IMAGE: image,
        CAPTION: caption,
        SOURCE_CLASS: _read_class(members, fields.class_, key),
        META: meta,
    }


def iter_tar_samples(stream) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {extension: bytes}) for consecutive members sharing a key.

    Members whose name has no extension are skipped. Raises tarfile/OSError errors when the tar is
    damaged; samples completed before the damage have been yielded by then.
    """
    current_key, members = None, {}
    with tarfile.open(fileobj=stream, mode="r|*") as archive:
        for member in archive:
            if not member.isfile():
                continue
            match = _KEY_AND_EXTENSION.match(member.name)
            if match is None:
                continue
            key, extension = match.group(1), match.group(2).lower()
            data = archive.extractfile(member).read()
            if len(data) != member.size:
                raise tarfile.ReadError(
                    f"member {member.name} is truncated ({len(data)} of {member.size} bytes)"
                )
            if key != current_key and current_key is not None:
                yield current_key, members
                members = {}
            current_key = key
            members[extension] = data
    if current_key is not None:
        yield current_key, members


def _row(shard: str, key: str | None, **values) -> dict:
    source_id = f"{shard}#{key}" if key is not None else shard
    row = {
        SHARD: shard,
        SOURCE_ID: source_id,
        STATUS: OK,
        FAILURES: NO_FAILURES,
        IMAGE: EMPTY_IMAGE,
        CAPTION: None,
        SOURCE_CLASS: None,
        META: "{}",
        STAGE_SECONDS: 0.0,
    }
    row.update(values)
    return row


def _error_row(shard: str, key: str | None, kind: str, message: str) -> dict:
    row = _row(shard, key)
    mark_failed(row, Failure("read", kind, message))
    return row


def _read_once(shard: str, fields: InputFields) -> tuple[list[dict], BaseException | None]:
    """One read of a shard: (rows of the samples read, the error that stopped the read or None)."""
    rows: list[dict] = []
    seen: set[str] = set()
    try:
        with fsspec.open(shard, "rb") as stream:
            for key, members in iter_tar_samples(stream):
                if key in seen:
                    rows.append(
                        _error_row(shard, key, "DuplicateKey", f"sample key {key} occurs twice in the shard")
                    )
                    continue
                seen.add(key)
                try:
                    rows.append(_row(shard, key, **parse_sample(key, members, fields)))
                except SampleError as error:
                    rows.append(_error_row(shard, key, error.kind, str(error)))
    except (tarfile.TarError, OSError, EOFError) as error:
        return rows, error
    return rows, None


def _backoff(retry: ReadRetry, attempt: int) -> float:
    """Seconds to wait after failed read number `attempt` (0-based): doubling, capped."""
    return min(retry.backoff_seconds * 2**attempt, retry.max_backoff_seconds)


def read_shard(
    item: dict, fields: InputFields, retry: ReadRetry | None = None, written: dict | None = None
) -> list[dict]:
    """Ray Data flat_map function: one shard URL -> one row per sample (plus a shard error row).

    A read that fails as a whole (the shard is missing, unreadable or ends early) is retried
    `retry.attempts` times in all with backoff; if the last read fails too, the samples it read are
    kept and one row for the shard's failure is added (`pipeline.stages.rows.is_shard_failure`).

    Args:
        item: {"shard": URL}.
        fields: sample member names.
        retry: re-reads of a failing shard (default ReadRetry()).
        written: shard URL -> source_ids already durable from an earlier run cut short by a limit;
            their rows are left out (they still count in shard_rows).

    Returns:
        Rows with the reader's columns (`pipeline.stages.rows`): shard, shard_rows, source_id, status,
        failures, image (uint8 (H, W, 3); (0, 0, 3) for error rows), caption, source_class, meta (JSON
        string), stage_seconds.
    """
    shard = item[SHARD]
    retry = retry or ReadRetry()
    for attempt in range(retry.attempts):
        rows, error = _read_once(shard, fields)
        if error is None:
            break
        if attempt + 1 < retry.attempts:
            time.sleep(_backoff(retry, attempt))
    if error is not None:
        kind = (
            "TruncatedTar"
            if rows or isinstance(error, tarfile.ReadError | EOFError)
            else type(error).__name__
        )
        message = f"shard {shard} unreadable after {len(rows)} samples ({retry.attempts} reads): {error}"
        rows.append(_error_row(shard, None, kind, message))
    if not rows:
        rows.append(_error_row(shard, None, EMPTY_SHARD, f"shard {shard} holds no samples"))
    for row in rows:
        row[SHARD_ROWS] = len(rows)
    done = set((written or {}).get(shard, ()))
    return [row for row in rows if row[SOURCE_ID] not in done]
