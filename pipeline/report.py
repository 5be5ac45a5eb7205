"""Read a job's output: DuckDB views over the Parquet tables, and a self-contained HTML report."""

from __future__ import annotations

import base64
import csv
import decimal
import html
import json
import math
from typing import TextIO

import duckdb
import fsspec
import pyarrow as pa

from pipeline.schemas import TABLES, load_schema
from pipeline.stages.rows import COMPOSITE_PREFIX, EDIT_METRICS

METRICS = EDIT_METRICS


def connect(output: str) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with views edits, sources and errors over OUTPUT's Parquet files.

    A table with no files yet is an empty view with the schema's columns.
    """
    fs, root = fsspec.core.url_to_fs(output)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    prefix = "" if protocol in ("file", "local") else f"{protocol}://"
    connection = duckdb.connect()
    if prefix:
        # DuckDB reads remote files through the same fsspec filesystem (credentials, endpoint) as the
        # job, instead of its own httpfs extension with separate settings.
        connection.register_filesystem(fs)
    for name in TABLES:
        table_schema = load_schema(name)
        files = (
            [path for path in fs.find(f"{root}/{name}") if path.endswith(".parquet")]
            if fs.exists(f"{root}/{name}")
            else []
        )
        if files:
            hive = "true" if table_schema.partition_by else "false"
            source = (
                f"read_parquet('{prefix}{root}/{name}/**/*.parquet', hive_partitioning={hive}, "
                "union_by_name=true)"
            )
            stored = {row[0] for row in connection.sql(f"describe select * from {source}").fetchall()}
            columns = ", ".join(_column(field, stored) for field in table_schema.schema)
            connection.sql(f"create view {name} as select {columns} from {source}")
        else:
            connection.register(f"_{name}_empty", pa.Table.from_pylist([], schema=table_schema.schema))
            connection.sql(f"create view {name} as select * from _{name}_empty")
    return connection


_DUCKDB_TYPES = {
    pa.string(): "VARCHAR",
    pa.binary(): "BLOB",
    pa.bool_(): "BOOLEAN",
    pa.int32(): "INTEGER",
    pa.int64(): "BIGINT",
    pa.float32(): "FLOAT",
    pa.float64(): "DOUBLE",
}


def _column(field: pa.Field, stored: set[str]) -> str:
    """A view column: the stored one, or null for a column added to the schema after the files were
    written (outputs of older versions stay readable, and files of both versions read together)."""
    if field.name in stored:
        return f'"{field.name}"'
    return f'cast(null as {_DUCKDB_TYPES[field.type]}) as "{field.name}"'


def open_table(output: str, name: str) -> duckdb.DuckDBPyRelation:
    """A lazy DuckDB relation over table `name` (edits | sources | errors) of OUTPUT.

    Example: `open_table("out/", "edits").filter("passed_filter").select("edit_id, image").fetchall()`.
    """
    if name not in TABLES:
        raise ValueError(f"unknown table {name!r}; tables are {', '.join(TABLES)}")
    return connect(output).table(name)


QUERY_FORMATS = ("table", "csv", "json")
BINARY_RENDERINGS = ("omit", "base64")
FETCH_ROWS = 1000


def _plain(value, binary: str):
    """A cell as a CSV/JSON value: bytes as base64 text, decimals as floats, NaN and infinities as null."""
    if isinstance(value, decimal.Decimal):
        value = float(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode() if binary == "base64" else None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _rows(reader: pa.RecordBatchReader, kept: list[int], binary: str):
    """The kept columns' values row by row, one Arrow batch in memory at a time."""
    for batch in reader:
        columns = [batch.column(index).to_pylist() for index in kept]
        for row in zip(*columns, strict=True):
            yield [_plain(value, binary) for value in row]


def write_result(result: duckdb.DuckDBPyRelation, fmt: str, stream: TextIO, binary: str = "omit") -> None:
    """Write a query's result to `stream` as CSV (header row first) or JSON (an array of objects).

    Args:
        result: the query's relation.
        fmt: "csv" or "json".
        stream: where to write (stdout for the CLI).
        binary: "omit" leaves binary columns (the PNG images) out; "base64" writes them base64-encoded.
    """
    if fmt not in ("csv", "json") or binary not in BINARY_RENDERINGS:
        raise ValueError(
            f"format {fmt!r} / binary {binary!r}: use csv|json and {'|'.join(BINARY_RENDERINGS)}"
        )
    reader = result.to_arrow_reader(FETCH_ROWS)
    fields = list(reader.schema)
    is_binary = [pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type) for f in fields]
    kept = [index for index in range(len(fields)) if binary == "base64" or not is_binary[index]]
    names = [fields[index].name for index in kept]
    rows = _rows(reader, kept, binary)
    if fmt == "csv":
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(names)
        writer.writerows(rows)
        return
    stream.write("[")
    for position, row in enumerate(rows):
        stream.write(
            ("," if position else "") + "\n" + json.dumps(dict(zip(names, row, strict=True)), default=str)
        )
    stream.write("\n]\n")


def _image(data: bytes | None, title: str = "", css: str | None = None) -> str:
    if data is None:
        return '<div class="missing">none</div>'
    encoded = base64.b64encode(data).decode()
    css_class = f' class="{css}"' if css else ""
    return f'<img{css_class} src="data:image/png;base64,{encoded}" title="{html.escape(title)}">'


def _number(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def _table(connection: duckdb.DuckDBPyConnection, sql: str) -> str:
    result = connection.sql(sql)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in result.columns)
    rows = "".join(
        "<tr>"
        + "".join(f"<td>{html.escape(_number(v) if isinstance(v, float) else str(v))}</td>" for v in row)
        + "</tr>"
        for row in result.fetchall()
    )
    return f"<table><tr>{head}</tr>{rows}</table>"


STYLE = """body{font-family:sans-serif;margin:2em} table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px} img{width:128px;height:128px;image-rendering:pixelated}
.row{display:flex;gap:12px;align-items:flex-start;border-top:1px solid #ddd;padding:8px 0}
.cell{font-size:12px;width:140px} .fail{color:#b00} .missing{width:128px;height:128px;background:#eee}
img.plot{width:auto;height:auto;max-width:100%;image-rendering:auto} .message{font-family:monospace}"""

MESSAGES_PER_TYPE = 20


def _svg_image(data: bytes, title: str) -> str:
    encoded = base64.b64encode(data).decode()
    return f'<img class="plot" src="data:image/svg+xml;base64,{encoded}" alt="{html.escape(title)}">'


def plots_section(connection: duckdb.DuckDBPyConnection) -> str:
    """Figures: each metric's distribution per target class; success rates per source class."""
    from pipeline.plots import metric_distributions, success_rates

    parts = ["<h2>Plots</h2>"]
    if not connection.sql("select count(*) from edits").fetchall()[0][0]:
        return "".join(parts) + "<p>no edits to plot</p>"
    rows = connection.sql(f"select target_class, {', '.join(METRICS)} from edits").fetchall()
    values: dict[str, dict[str, list[float]]] = {metric: {} for metric in METRICS}
    for target_class, *metrics in rows:
        for metric, value in zip(METRICS, metrics, strict=True):
            defined = values[metric].setdefault(target_class, [])
            if value is not None and math.isfinite(value):
                defined.append(value)
    parts.append(_svg_image(metric_distributions(values), "metric distributions per target class"))
    rates = connection.sql(
        "select coalesce(source_class, '(none)'), count(*), avg(passed_filter::int), "
        "avg((classified_as = target_class)::int) from edits group by 1 order by 1"
    ).fetchall()
    series = {"passed the filter": [row[2] for row in rates]}
    if any(row[3] is not None for row in rates):  # only with a classifier configured
        series["read as the target class"] = [row[3] for row in rates]
    figure = success_rates([row[0] for row in rates], [row[1] for row in rates], series)
    parts.append(_svg_image(figure, "success rate per source class"))
    return "".join(parts)


def composite_section(connection: duckdb.DuckDBPyConnection) -> str:
    """With output.composite: per target class, the composited edits' metric means beside the raw ones."""
    if not connection.sql("select count(composite_image) from edits").fetchall()[0][0]:
        return ""
    pairs = ", ".join(
        f"avg({metric}) as {metric}, avg({COMPOSITE_PREFIX}{metric}) as {COMPOSITE_PREFIX}{metric}"
        for metric in METRICS
    )
    return "<h2>Composited edits (raw vs composite)</h2>" + _table(
        connection,
        f"select target_class, method, count(*) as composited, {pairs} from edits "
        "where composite_image is not null group by 1, 2 order by 1, 2",
    )


def samples_section(connection: duckdb.DuckDBPyConnection, max_groups: int = 50) -> str:
    """Stochastic edits (`samples: K`): per target class and method, the groups, samples per group and
    mean diversity beside its upper bound; then, per group, the source and its K samples side by side."""
    if not connection.sql("select count(sample_group) from edits").fetchall()[0][0]:
        return ""
    parts = [
        "<h2>Stochastic samples</h2>",
        _table(
            connection,
            "select target_class, method, count(distinct sample_group) as groups, "
            "count(*) // count(distinct sample_group) as samples_per_group, avg(diversity) as diversity, "
            "avg(diversity_bound) as diversity_bound from edits where sample_group is not null "
            "group by 1, 2 order by 1, 2",
        ),
    ]
    groups = connection.sql(
        "select e.sample_group, any_value(e.source_id), any_value(e.target_prompt), any_value(e.diversity), "
        "any_value(e.diversity_bound), any_value(s.image), "
        "list(e.image order by e.sample_index), list(e.sample_index order by e.sample_index), "
        "list(e.sample_seed order by e.sample_index) "
        "from edits e left join sources s using (source_id) where e.sample_group is not null "
        f"group by 1 order by 2, 3 limit {int(max_groups)}"
    ).fetchall()
    for _, source_id, prompt, diversity, bound, source_image, images, indices, seeds in groups:
        cells = [
            f'<div class="cell">{_image(source_image)}<br>source<br><small>{html.escape(source_id)}</small>'
            f"<br>{html.escape(prompt)}<br>diversity {_number(diversity)} (bound {_number(bound)})</div>"
        ]
        cells += [
            f'<div class="cell">{_image(image, css="sample")}<br>sample {index} (seed {seed})</div>'
            for image, index, seed in zip(images, indices, seeds, strict=True)
        ]
        parts.append(f'<div class="row">{"".join(cells)}</div>')
    return "".join(parts)


def errors_section(connection: duckdb.DuckDBPyConnection) -> str:
    """Errors per stage and type, then each type's distinct messages with their counts and an example."""
    if not connection.sql("select count(*) from errors").fetchall()[0][0]:
        return "<h2>Errors</h2><p>no errors</p>"
    parts = [
        "<h2>Errors</h2>",
        _table(
            connection,
            "select stage, error_type, count(*) as n, count(distinct error) as messages, min(source_id) as example "
            "from errors group by 1, 2 order by 1, 2",
        ),
    ]
    messages = connection.sql(
        "select stage, error_type, error, count(*) as n, min(source_id) as example from errors "
        "group by 1, 2, 3 order by 1, 2, n desc, error"
    ).fetchall()
    grouped: dict[tuple[str, str], list] = {}
    for stage, error_type, *rest in messages:
        grouped.setdefault((stage, error_type), []).append(rest)
    for (stage, error_type), rows in grouped.items():
        shown = rows[:MESSAGES_PER_TYPE]
        body = "".join(
            f'<tr><td class="message">{html.escape(message)}</td><td>{n}</td><td>{html.escape(example)}</td></tr>'
            for message, n, example in shown
        )
        more = f"<p>and {len(rows) - len(shown)} more distinct messages</p>" if len(rows) > len(shown) else ""
        parts.append(
            f"<h3>{html.escape(stage)}: {html.escape(error_type)}</h3>"
            f"<table><tr><th>message</th><th>n</th><th>example</th></tr>{body}</table>{more}"
        )
    return "".join(parts)


def write_report(output: str, path: str | None = None, max_sources: int = 200) -> str:
    """Write OUTPUT/report.html (or `path`); returns where it went.

    Sections: manifest counts; per-target-class metric means (and, with output.composite, the composited
    edits' means beside their raw ones); sources; plots (metric distributions per
    target class, success rates per source class); stochastic samples (diversity per target class, each
    group's K samples side by side); errors by stage and type with their messages; a
    gallery with, per source, the source image, its reconstruction (with PSNR/SSIM/LPIPS) and every edit
    with its metrics.
    """
    fs, root = fsspec.core.url_to_fs(output)
    connection = connect(output)
    manifest = json.loads(fs.cat_file(f"{root}/manifest.json")) if fs.exists(f"{root}/manifest.json") else {}
    means = ", ".join(f"avg({m}) as {m}" for m in METRICS)
    parts = [
        f"<html><head><meta charset='utf-8'><title>inversa report</title><style>{STYLE}</style></head><body>"
    ]
    parts.append(f"<h1>inversa report: {html.escape(manifest.get('name', output))}</h1>")
    if manifest:
        counts = "".join(
            f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in manifest["counts"].items()
        )
        parts.append(
            f"<p>model {html.escape(manifest['model_id'])}, metrics {html.escape(json.dumps(manifest['metrics_backbones']))}</p><table>{counts}</table>"
        )
    parts.append("<h2>Edits per target class</h2>")
    parts.append(
        _table(
            connection,
            f"select target_class, method, count(*) as edits, avg(passed_filter::int) as pass_rate, avg((classified_as = target_class)::int) as classified_as_target, {means} from edits group by 1, 2 order by 1, 2",
        )
    )
    parts.append(composite_section(connection))
    parts.append("<h2>Sources</h2>")
    parts.append(
        _table(
            connection,
            "select status, count(*) as sources, avg(recon_psnr) as recon_psnr, avg(recon_ssim) as recon_ssim, avg(recon_lpips) as recon_lpips from sources group by 1 order by 1",
        )
    )
    parts.append(plots_section(connection))
    parts.append(samples_section(connection))
    parts.append(errors_section(connection))
    parts.append("<h2>Gallery</h2>")
    sources = connection.sql(
        f"select source_id, caption, image, reconstruction, recon_psnr, recon_ssim, recon_lpips from sources order by source_id limit {int(max_sources)}"
    ).fetchall()
    edits_by_source: dict[str, list] = {}
    if sources:
        connection.register("_shown", pa.table({"source_id": [s[0] for s in sources]}))
        edit_rows = connection.sql(
            f"select source_id, target_prompt, seed, image, composite_image, classified_as, passed_filter, filter_reason, {', '.join(METRICS)} "
            "from edits where source_id in (select source_id from _shown) order by source_id, target_class, target_prompt, seed"
        ).fetchall()
        for row in edit_rows:
            edits_by_source.setdefault(row[0], []).append(row)
    for source_id, caption, image, reconstruction, recon_psnr, recon_ssim, recon_lpips in sources:
        cells = [
            f'<div class="cell">{_image(image)}<br>source<br>{html.escape(caption or "")}<br><small>{html.escape(source_id)}</small></div>',
            f'<div class="cell">{_image(reconstruction)}<br>reconstruction<br>PSNR {_number(recon_psnr)} SSIM {_number(recon_ssim)} LPIPS {_number(recon_lpips)}</div>',
        ]
        for (
            _,
            prompt,
            seed,
            edit_image,
            composite,
            classified_as,
            passed,
            reason,
            *values,
        ) in edits_by_source.get(source_id, []):
            metrics = " ".join(
                f"{name} {_number(value)}" for name, value in zip(METRICS, values, strict=True)
            )
            if classified_as is not None:
                metrics += f"<br>classified as {html.escape(classified_as)}"
            verdict = "passed" if passed else f'<span class="fail">{html.escape(reason or "")}</span>'
            cells.append(
                f'<div class="cell">{_image(edit_image)}<br>{html.escape(prompt)} (seed {seed})<br>{metrics}<br>{verdict}</div>'
            )
            if composite is not None:
                cells.append(f'<div class="cell">{_image(composite)}<br>composited into the source</div>')
        parts.append(f'<div class="row">{"".join(cells)}</div>')
    parts.append("</body></html>")
    target = path or f"{root}/report.html"
    target_fs, target_path = fsspec.core.url_to_fs(target) if path else (fs, target)
    with target_fs.open(target_path, "w") as handle:
        handle.write("\n".join(parts))
    return target
