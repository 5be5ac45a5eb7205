"""Output table schemas, loaded from the language-neutral JSON files in `schemas/`.

The JSON files are the one place column names, types and nullability are defined; every writer
builds its tables through `to_table`, which refuses rows that do not match, and readers cast with
`read_schema`. Each file holds::

    {"table": NAME, "partition_by": [COLUMN, ...],
     "columns": [{"name": ..., "type": ..., "nullable": ..., "description": ...}, ...]}

`type` is an Arrow type name: string, binary, bool, int32, int64, float32, float64, list<string>.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pyarrow as pa

TABLES: tuple[str, ...] = ("edits", "sources", "errors")

_ARROW_TYPES = {
    "string": pa.string(),
    "binary": pa.binary(),
    "bool": pa.bool_(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    "list<string>": pa.list_(pa.string()),
}


class SchemaError(ValueError):
    """Rows that do not match a table's schema, or an unreadable schema file."""


@dataclass(frozen=True)
class TableSchema:
    """One output table.

    Attributes:
        name: table name (also the output sub-folder).
        schema: the full Arrow schema, partition columns included.
        partition_by: hive partition columns (stored in folder names, not in the files).
        descriptions: column name -> description.
    """

    name: str
    schema: pa.Schema
    partition_by: tuple[str, ...]
    descriptions: dict[str, str]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.schema.names)

    @property
    def file_schema(self) -> pa.Schema:
        """The schema of the Parquet files: the partition columns live in the folder names."""
        return pa.schema([f for f in self.schema if f.name not in self.partition_by])


def schema_dir() -> Path:
    """The folder holding the schema JSON files ($INVERSA_SCHEMA_DIR overrides)."""
    override = os.environ.get("INVERSA_SCHEMA_DIR")
    return Path(override) if override else Path(__file__).resolve().parents[1] / "schemas"


def parse_schema(spec: dict, origin: str) -> TableSchema:
    """Build a TableSchema from the JSON form (see the module docstring)."""
    fields, descriptions = [], {}
    for column in spec["columns"]:
        type_name = column["type"]
        if type_name not in _ARROW_TYPES:
            raise SchemaError(
                f"{origin}: column {column['name']!r} has unknown type {type_name!r}; use one of {sorted(_ARROW_TYPES)}"
            )
        fields.append(pa.field(column["name"], _ARROW_TYPES[type_name], nullable=bool(column["nullable"])))
        descriptions[column["name"]] = column.get("description", "")
    return TableSchema(spec["table"], pa.schema(fields), tuple(spec.get("partition_by", ())), descriptions)


@cache
def load_schema(name: str) -> TableSchema:
    """The schema of table `name` (edits | sources | errors)."""
    if name not in TABLES:
        raise SchemaError(f"unknown table {name!r}; tables are {TABLES}")
    path = schema_dir() / f"{name}.json"
    if not path.exists():
        raise SchemaError(
            f"schema file {path} is missing; set INVERSA_SCHEMA_DIR to the repository's schemas/ folder"
        )
    return parse_schema(json.loads(path.read_text()), str(path))


def to_table(name: str, rows: list[dict]) -> pa.Table:
    """Rows (dicts keyed by column name) -> an Arrow table with exactly the schema of `name`.

    Raises:
        SchemaError: a row has a missing or extra column, a null in a non-nullable column, or a value
            that cannot be converted to the column's type. The message names the table and column.
    """
    table_schema = load_schema(name)
    expected = set(table_schema.names)
    for index, row in enumerate(rows):
        if set(row) != expected:
            missing, extra = sorted(expected - set(row)), sorted(set(row) - expected)
            raise SchemaError(
                f"table {name!r} row {index}: missing columns {missing}, unexpected columns {extra}"
            )
    arrays = []
    for field in table_schema.schema:
        values = [row[field.name] for row in rows]
        if not field.nullable and any(value is None for value in values):
            raise SchemaError(f"table {name!r}: column {field.name!r} is not nullable but a row holds null")
        try:
            arrays.append(pa.array(values, type=field.type))
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError) as error:
            raise SchemaError(f"table {name!r}: column {field.name!r} ({field.type}): {error}") from error
    return pa.Table.from_arrays(arrays, schema=table_schema.schema)


def validate_table(name: str, table: pa.Table) -> None:
    """Raise SchemaError unless `table` has exactly the columns, types and nullability of `name`."""
    expected = load_schema(name).schema
    if table.schema.names != expected.names:
        raise SchemaError(f"table {name!r}: columns {table.schema.names} != schema {expected.names}")
    for field in expected:
        actual = table.schema.field(field.name)
        if actual.type != field.type:
            raise SchemaError(
                f"table {name!r}: column {field.name!r} has type {actual.type}, schema says {field.type}"
            )
        if not field.nullable and table.column(field.name).null_count:
            raise SchemaError(f"table {name!r}: column {field.name!r} is not nullable but holds nulls")
