"""`inversa` command line: run | validate | submit | status | logs | query | report | export.

    inversa run jobs/example_local.yaml --output out/ --set inversion.num_steps=10
    inversa validate jobs/example_sd15_cluster.yaml
    inversa submit jobs/example_sd15_cluster.yaml --address http://HEAD:8265
    inversa status raysubmit_XXXX --address http://HEAD:8265
    inversa query out/ "select target_class, avg(clip_t) from edits group by 1"
    inversa query out/ "select edit_id, clip_t from edits" --format csv > metrics.csv
    inversa report out/
    inversa export out/ train-shards/ --format webdataset --originals-ratio 0.5 --seed 0

Clusters started with RAY_AUTH_MODE=token need the token on the submitting machine: Ray's client reads
RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (export RAY_AUTH_MODE=token as well).
"""

from __future__ import annotations

import shlex
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from pipeline.config import ConfigError, load_config, to_dict

app = typer.Typer(
    help="Dataset augmentation by diffusion inversion and editing, on Ray Data.", no_args_is_help=True
)
console = Console()

SetOption = typer.Option(
    None, "--set", help="Override a key: dotted.key=value (value parsed as YAML). Repeatable."
)


def _load(job: Path | str, overrides: list[str] | None, output: str | None = None):
    try:
        return load_config(job, overrides or (), output)
    except ConfigError as error:
        console.print(f"[red]invalid job spec:[/red] {error}")
        raise typer.Exit(2) from error


def summary_table(manifest: dict) -> Table:
    """The end-of-run summary: counts and times from the manifest."""
    table = Table(title=f"inversa: {manifest['name']}")
    table.add_column("what")
    table.add_column("value", justify="right")
    for name, value in manifest["counts"].items():
        table.add_row(name, str(value))
    shards = manifest["shards"]
    table.add_row("shards complete", f"{len(shards['complete'])}/{shards['total']}")
    table.add_row("wall seconds", f"{manifest['wall_seconds']:.1f}")
    table.add_row("in-actor compute seconds", f"{manifest['compute_seconds']:.1f}")
    return table


@app.command()
def run(
    job: str = typer.Argument(..., help="Job spec YAML (or env:NAME to read it from a variable)."),
    output: str | None = typer.Option(None, help="Output URI (overrides output.path)."),
    address: str | None = typer.Option(
        None, help="Ray address to join (default: RAY_ADDRESS or a local Ray)."
    ),
    limit: int | None = typer.Option(None, help="Process at most N input samples (in shard order)."),
    set_: list[str] | None = SetOption,
    overwrite: bool = typer.Option(False, help="Delete the output first instead of resuming."),
) -> None:
    """Run a job; reruns resume, skipping completed shards."""
    from pipeline.dataflow import JobError, run_job

    config = _load(job, set_, output)
    try:
        manifest = run_job(config, limit=limit, overwrite=overwrite, address=address)
    except JobError as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(1) from error
    console.print(summary_table(manifest))
    console.print(f"output: {config.output.path}")


@app.command()
def validate(job: Path = typer.Argument(...), set_: list[str] | None = SetOption) -> None:
    """Parse and check a job spec; print the resolved spec."""
    import yaml

    config = _load(job, set_)
    console.print(yaml.safe_dump(to_dict(config), sort_keys=False))
    console.print(f"[green]{job}: valid[/green]")


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def project_root() -> Path:
    """The folder holding the `pipeline` package (uploaded as the job's working_dir)."""
    return Path(__file__).resolve().parents[1]


SPEC_VARIABLE = "INVERSA_JOB_SPEC"


@app.command()
def submit(
    job: Path = typer.Argument(..., help="Job spec YAML."),
    address: str = typer.Option(..., help="Ray dashboard address, e.g. http://HEAD:8265."),
    output: str | None = typer.Option(None),
    limit: int | None = typer.Option(None),
    set_: list[str] | None = SetOption,
    overwrite: bool = typer.Option(False),
    working_dir: Path | None = typer.Option(
        None, help="Folder uploaded as the job's working_dir (default: the project root)."
    ),
) -> None:
    """Submit `inversa run` to a Ray cluster through the Jobs API; prints the submission id.

    The spec is resolved here (--set, --output applied, checked) and handed to the job in the
    runtime_env, so the cluster runs exactly what was validated. Relative paths inside it are
    resolved on the cluster, relative to the uploaded working_dir; prefer absolute URLs.
    """
    import yaml

    config = _load(job, set_, output)  # fail here, not on the cluster
    arguments = ["python", "-m", "pipeline.cli", "run", f"env:{SPEC_VARIABLE}"]
    arguments += ["--limit", str(limit)] if limit is not None else []
    arguments += ["--overwrite"] if overwrite else []
    runtime_env = {
        "working_dir": str((working_dir or project_root()).resolve()),
        "excludes": [".git", "**/__pycache__", "out", ".cache", "*.egg-info"],
        "env_vars": {SPEC_VARIABLE: yaml.safe_dump(to_dict(config), sort_keys=False)},
    }
    submission_id = _client(address).submit_job(entrypoint=shlex.join(arguments), runtime_env=runtime_env)
    print(submission_id)


@app.command()
def status(submission_id: str, address: str = typer.Option(..., help="Ray dashboard address.")) -> None:
    """Print a submitted job's status."""
    print(_client(address).get_job_status(submission_id).value)


@app.command()
def logs(submission_id: str, address: str = typer.Option(..., help="Ray dashboard address.")) -> None:
    """Print a submitted job's logs."""
    print(_client(address).get_job_logs(submission_id))


def print_table(result) -> None:
    """A query's result as a rich table; binary cells (the images) shown as their size."""
    table = Table()
    for column in result.columns:
        table.add_column(column)
    for row in result.fetchall():
        table.add_row(*(f"<{len(v)} bytes>" if isinstance(v, bytes) else str(v) for v in row))
    console.print(table)


@app.command()
def query(
    output: str = typer.Argument(...),
    sql: str = typer.Argument(...),
    format_: str = typer.Option(
        "table", "--format", help="table (for reading), csv or json (machine-readable, to stdout)."
    ),
    binary: str = typer.Option(
        "omit", help="csv/json only: omit binary columns (the PNG images) or write them as base64."
    ),
) -> None:
    """Run DuckDB SQL over the output's tables (views edits, sources, errors)."""
    import sys

    from pipeline.report import BINARY_RENDERINGS, QUERY_FORMATS, connect, write_result

    if format_ not in QUERY_FORMATS or binary not in BINARY_RENDERINGS:
        console.print(
            f"[red]--format {format_} --binary {binary}: use --format {'|'.join(QUERY_FORMATS)} "
            f"and --binary {'|'.join(BINARY_RENDERINGS)}[/red]",
            soft_wrap=True,
        )
        raise typer.Exit(2)
    result = connect(output).sql(sql)
    if format_ == "table":
        print_table(result)
    else:
        write_result(result, format_, sys.stdout, binary)


@app.command()
def export(
    output: str = typer.Argument(..., help="The job's output (local folder or URL, e.g. s3://...)."),
    destination: str = typer.Argument(..., help="Folder (or URL) to write the export to."),
    format_: str = typer.Option("webdataset", "--format", help="webdataset (tar shards) or datasets."),
    originals_ratio: float = typer.Option(
        0.0, help="Originals per exported edit (originals:edits), drawn from the sources with a class."
    ),
    seed: int = typer.Option(0, help="Seeds the choice of originals and the sample order."),
    shard_size: int = typer.Option(1000, help="Samples per shard (tar file or Arrow file)."),
    overwrite: bool = typer.Option(False, help="Replace DEST if it is not empty."),
) -> None:
    """Export the edits that passed the filter (label: target class), optionally mixed with original
    images (label: source class), as WebDataset shards or a Hugging Face dataset (save_to_disk)."""
    from pipeline.export import ExportError, export_output

    try:
        summary = export_output(output, destination, format_, originals_ratio, seed, shard_size, overwrite)
    except ExportError as error:
        console.print(f"[red]export: {error}[/red]", soft_wrap=True)
        raise typer.Exit(2) from error
    counts = summary["counts"]
    console.print(
        f"{destination}: {counts['samples']} samples ({counts['edits_passed']} of {counts['edits']} edits "
        f"passed the filter, {counts['originals']} originals), classes {', '.join(summary['classes'])}"
    )


@app.command()
def report(
    output: str = typer.Argument(...),
    path: str | None = typer.Option(None, help="HTML file to write (default OUTPUT/report.html)."),
    max_sources: int = typer.Option(200, help="Sources shown in the gallery."),
) -> None:
    """Write a self-contained HTML report: per source, source | reconstruction | edits with metrics."""
    from pipeline.report import write_report

    print(write_report(output, path, max_sources))


if __name__ == "__main__":
    app()
