"""The row contract of the stages: the in-flight column names, row statuses and typed failures.

Rows are one per input sample from the reader to the writer. Each stage adds columns:

    read        shard, shard_rows, source_id, status, failures, image, caption, source_class, meta,
                stage_seconds
    preprocess  image (resized), orig_width, orig_height
    invert_edit recon, invert_seconds, edits_json, edit_images, edit_masks, model_id, model_fingerprint,
                gpu_peak_bytes (the actor's torch.cuda.max_memory_allocated; NaN without a GPU)
    score       recon_psnr, recon_ssim, recon_lpips, composite_images (per row (E, S, S, 3) uint8: each
                edit composited into its source with output.composite, else the edit itself; a
                record's "composited" says which), and the metric values inside edits_json
    filter      passed_filter / filter_reason inside edits_json

A row's `failures` column holds its failures as one JSON list (`encode_failures`); every stage records
one through `mark_failed`. A failure of the row itself (its read, inversion or scoring) also sets the
row's status and leads the list; a failure of one edit (or of an edit that could not be planned)
leaves the row's status as it is. The writer turns each failure into one row of the errors table.

The output tables' column names are defined by the schema files (`pipeline.schemas`), not here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, MutableMapping
from dataclasses import asdict, dataclass
from typing import Any

# Columns added by the reader.
SHARD = "shard"
SHARD_ROWS = "shard_rows"
SOURCE_ID = "source_id"
STATUS = "status"
FAILURES = "failures"
IMAGE = "image"
CAPTION = "caption"
SOURCE_CLASS = "source_class"
META = "meta"
STAGE_SECONDS = "stage_seconds"
# Columns added by preprocessing.
ORIG_WIDTH = "orig_width"
ORIG_HEIGHT = "orig_height"
# Columns added by the invert/edit actor.
RECON = "recon"
INVERT_SECONDS = "invert_seconds"
EDITS_JSON = "edits_json"
EDIT_IMAGES = "edit_images"
EDIT_MASKS = "edit_masks"
MODEL_ID = "model_id"
MODEL_FINGERPRINT = "model_fingerprint"
GPU_PEAK_BYTES = "gpu_peak_bytes"
INVERSION_STATES = "inversion_states"
# Columns added by the score actor.
RECON_PSNR = "recon_psnr"
RECON_SSIM = "recon_ssim"
RECON_LPIPS = "recon_lpips"
COMPOSITE_IMAGES = "composite_images"

# The per-edit metrics the score actor puts into edits_json, each an edits table column of that name;
# with output.composite the composited edits get them again as COMPOSITE_PREFIX + name.
EDIT_METRICS = (
    "clip_t",
    "clip_t_edited",
    "clip_i",
    "clip_dir",
    "lpips",
    "structure_dist",
    "bg_psnr",
    "bg_mse",
    "bg_ssim",
    "bg_lpips",
)
COMPOSITE_PREFIX = "composite_"

# Row statuses: OK, or the status of a row whose failure happened in that stage.
OK = "ok"
FAILED_STATUS = {"read": "error", "invert": "invert_failed", "score": "score_failed"}
READ_FAILED = FAILED_STATUS["read"]
INVERT_FAILED = FAILED_STATUS["invert"]
SCORE_FAILED = FAILED_STATUS["score"]


@dataclass(frozen=True)
class Failure:
    """Why a row or one of its edits produced no output; one row of the errors table.

    Attributes:
        stage: where it failed: read | plan | invert | edit | score.
        error_type: the kind of failure (e.g. CorruptImage, PlanError, InversionError, EditError).
        message: what went wrong, for a person.
        edit_id: the failed edit, or None when the failure is the row's (or an unplannable edit's).
    """

    stage: str
    error_type: str
    message: str
    edit_id: str | None = None

    @classmethod
    def from_error(cls, stage: str, error: BaseException, edit_id: str | None = None) -> Failure:
        """A failure labelled with the exception's type name and message."""
        return cls(stage, type(error).__name__, str(error), edit_id)


def encode_failures(failures: list[Failure]) -> str:
    """The `failures` column value of a row: a JSON list of failures, in order."""
    return json.dumps([asdict(failure) for failure in failures])


def decode_failures(text: str) -> list[Failure]:
    """The failures of a `failures` column value (see `encode_failures`)."""
    return [Failure(**record) for record in json.loads(text)]


NO_FAILURES = encode_failures([])

# A readable shard without samples: its one error row completes it (reading it again finds nothing more).
EMPTY_SHARD = "EmptyShard"


def is_shard_failure(source_id: str, shard: str, failures: str) -> bool:
    """Whether a row stands for its whole shard failing to read (missing, unreadable, truncated).

    The reader gives such a row the shard URL as source_id. The shard is not complete: the job records
    it as failed and a rerun reads it again.
    """
    if source_id != shard:
        return False
    recorded = decode_failures(failures)
    return bool(recorded) and recorded[0].stage == "read" and recorded[0].error_type != EMPTY_SHARD


def mark_failed(row: MutableMapping[str, Any], failure: Failure, *, fails_row: bool = True) -> None:
    """Record `failure` on `row` (a mapping with the status and failures columns).

    Args:
        row: the row; a dict, or `BatchRow` for a row of a column batch.
        failure: what failed.
        fails_row: the row itself failed: its status becomes the failed status of `failure.stage`
            and the failure leads its list. False for a failure of one edit, which is appended.

    Raises:
        ValueError: fails_row for a stage that has no failed status (only read, invert and score do).
    """
    failures = decode_failures(row[FAILURES])
    if fails_row:
        if failure.stage not in FAILED_STATUS:
            raise ValueError(
                f"stage {failure.stage!r} cannot fail a row; stages that can: {sorted(FAILED_STATUS)}"
            )
        row[STATUS] = FAILED_STATUS[failure.stage]
        failures.insert(0, failure)
    else:
        failures.append(failure)
    row[FAILURES] = encode_failures(failures)


class BatchRow(MutableMapping):
    """Row `index` of a column batch (name -> array) as a mapping; writes go into the columns.

    Args:
        columns: the batch's columns, writable.
        index: the row.
    """

    def __init__(self, columns: MutableMapping[str, Any], index: int):
        self.columns = columns
        self.index = index

    def __getitem__(self, name: str) -> Any:
        return self.columns[name][self.index]

    def __setitem__(self, name: str, value: Any) -> None:
        self.columns[name][self.index] = value

    def __delitem__(self, name: str) -> None:
        raise TypeError("a batch row's columns cannot be deleted")

    def __iter__(self) -> Iterator[str]:
        return iter(self.columns)

    def __len__(self) -> int:
        return len(self.columns)
