"""`inversa query --format csv|json` (machine-readable stdout, images omitted or base64) and the Python
API's DuckDB relations, checked against the rows as written."""

from __future__ import annotations

import base64
import csv
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from output_tables import write_output
from typer.testing import CliRunner

import pipeline
from pipeline.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict:
    output = tmp_path_factory.mktemp("query") / "out"
    return {"output": str(output), "rows": write_output(str(output))}


def query(output: str, sql: str, *options: str) -> str:
    result = runner.invoke(app, ["query", output, sql, *options])
    assert result.exit_code == 0, result.output
    return result.stdout


def test_csv_holds_every_row_and_omits_images(written):
    text = query(written["output"], "select * from sources order by source_id", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    expected = sorted(written["rows"]["sources"], key=lambda row: row["source_id"])
    assert [row["source_id"] for row in rows] == [row["source_id"] for row in expected]
    assert "image" not in rows[0] and "reconstruction" not in rows[0]
    for row, source in zip(rows, expected, strict=True):
        assert float(row["recon_psnr"]) == pytest.approx(source["recon_psnr"])
        assert row["source_class"] == (source["source_class"] or "")  # csv: null is an empty field


def test_json_with_base64_images_decodes_to_the_stored_bytes(written):
    sql = "select edit_id, image, bg_psnr, passed_filter from edits order by edit_id"
    records = json.loads(query(written["output"], sql, "--format", "json", "--binary", "base64"))
    expected = sorted(written["rows"]["edits"], key=lambda row: row["edit_id"])
    assert [r["edit_id"] for r in records] == [row["edit_id"] for row in expected]
    for record, row in zip(records, expected, strict=True):
        assert base64.b64decode(record["image"]) == row["image"]
        assert record["passed_filter"] is row["passed_filter"]
        assert (record["bg_psnr"] is None) == (row["bg_psnr"] is None)
    omitted = json.loads(query(written["output"], sql, "--format", "json"))
    assert set(omitted[0]) == {"edit_id", "bg_psnr", "passed_filter"}


def test_non_finite_values_are_json_null(written):
    records = json.loads(query(written["output"], "select 'nan'::double as x, 1.5 as y", "--format", "json"))
    assert records == [{"x": None, "y": 1.5}]


def test_an_unknown_format_is_one_line_and_exit_2(written):
    result = runner.invoke(app, ["query", written["output"], "select 1", "--format", "xml"])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "--format table|csv|json" in result.output


def test_open_table_is_a_relation_over_the_table(written):
    relation = pipeline.open_table(written["output"], "edits")
    passed = relation.filter("passed_filter").aggregate("count(*)").fetchall()[0][0]
    assert passed == sum(row["passed_filter"] for row in written["rows"]["edits"])
    classes = {row[0] for row in relation.select("target_class").distinct().fetchall()}
    assert classes == {row["target_class"] for row in written["rows"]["edits"]}  # "red panda" decoded
    with pytest.raises(ValueError, match="unknown table"):
        pipeline.open_table(written["output"], "edit")


def test_outputs_written_before_the_sample_columns_read_with_them_null(tmp_path):
    """Files of an older writer (no sample or diversity columns) read as before, alone and beside new
    files; the new columns are null for them."""

    output = tmp_path / "out"
    rows = write_output(str(output))
    added = ("sample_seed", "sample_group", "diversity", "diversity_bound")
    files = sorted((output / "edits").rglob("*.parquet"))
    first = pq.read_table(files[0])
    pq.write_table(first.drop_columns(list(added)), files[0])  # as an older version wrote it
    new_rows = 0
    for new in files[1:]:  # the newer files hold sample seeds
        table = pq.read_table(new)
        seeds = pa.array([7] * table.num_rows, type=pa.int64())
        index = table.column_names.index("sample_seed")
        pq.write_table(table.set_column(index, "sample_seed", seeds), new)
        new_rows += table.num_rows
    relation = pipeline.open_table(str(output), "edits")
    assert relation.count("*").fetchall()[0][0] == len(rows["edits"])
    assert set(added) <= set(relation.columns)
    assert relation.filter("sample_seed = 7").count("*").fetchall()[0][0] == new_rows > 0
    assert relation.filter("diversity is not null").count("*").fetchall()[0][0] == 0
    for old in files:
        table = pq.read_table(old)
        pq.write_table(table.drop_columns([c for c in added if c in table.column_names]), old)
    only_old = pipeline.open_table(str(output), "edits")
    assert only_old.count("*").fetchall()[0][0] == len(rows["edits"])
    assert only_old.filter("sample_group is null").count("*").fetchall()[0][0] == len(rows["edits"])
