"""The stages' row contract: failures recorded with mark_failed, on dict rows and on rows of a batch."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.stages.rows import (
    FAILURES,
    NO_FAILURES,
    OK,
    STATUS,
    BatchRow,
    Failure,
    decode_failures,
    encode_failures,
    mark_failed,
)


def test_failures_survive_their_encoding_in_order():
    failures = [Failure("plan", "PlanError", "no word"), Failure("edit", "EditError", "rejected", "e1")]
    assert decode_failures(encode_failures(failures)) == failures
    assert decode_failures(NO_FAILURES) == []


def test_from_error_labels_with_the_exception_type():
    assert Failure.from_error("score", TypeError("bad output")) == Failure("score", "TypeError", "bad output")


def test_a_row_failure_sets_the_stage_status_and_leads_the_list():
    row = {STATUS: OK, FAILURES: NO_FAILURES}
    edit = Failure("edit", "EditError", "rejected", "e1")
    mark_failed(row, edit, fails_row=False)
    assert row[STATUS] == OK
    mark_failed(row, Failure("score", "RuntimeError", "out of memory"))
    assert row[STATUS] == "score_failed"
    assert decode_failures(row[FAILURES]) == [Failure("score", "RuntimeError", "out of memory"), edit]


@pytest.mark.parametrize(("stage", "status"), [("read", "error"), ("invert", "invert_failed")])
def test_each_failing_stage_has_its_status(stage, status):
    row = {STATUS: OK, FAILURES: NO_FAILURES}
    mark_failed(row, Failure(stage, "X", "y"))
    assert row[STATUS] == status


def test_only_read_invert_and_score_can_fail_a_row():
    row = {STATUS: OK, FAILURES: NO_FAILURES}
    with pytest.raises(ValueError, match="cannot fail a row"):
        mark_failed(row, Failure("edit", "EditError", "rejected", "e1"))
    assert row == {STATUS: OK, FAILURES: NO_FAILURES}


def test_batch_row_writes_into_the_columns():
    columns = {STATUS: np.array([OK, OK], dtype=object), FAILURES: np.array([NO_FAILURES] * 2, dtype=object)}
    mark_failed(BatchRow(columns, 1), Failure("invert", "InversionError", "diverged"))
    assert list(columns[STATUS]) == [OK, "invert_failed"]
    assert columns[FAILURES][0] == NO_FAILURES
    assert decode_failures(columns[FAILURES][1]) == [Failure("invert", "InversionError", "diverged")]
