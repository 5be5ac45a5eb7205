"""`inversa` command line: run | validate | submit | status | logs | query | report.

    inversa run jobs/example_local.yaml --output out/ --set inversion.num_steps=10
    inversa validate jobs/example_sd15_cluster.yaml
    inversa submit jobs/example_sd15_cluster.yaml --address http://HEAD:8265
    inversa status raysubmit_XXXX --address http://HEAD:8265
    inversa query out/ "select target_class, avg(clip_t) from edits group by 1"
    inversa report out/

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


@app.command()
def query(output: str = typer.Argument(...), sql: str = typer.Argument(...)) -> None:
    """Run DuckDB SQL over the output's tables (views edits, sources, errors)."""
    from pipeline.report import connect

    result = connect(output).sql(sql)
    table = Table()
    for column in result.columns:
        table.add_column(column)
    for row in result.fetchall():
        table.add_row(*(f"<{len(v)} bytes>" if isinstance(v, bytes) else str(v) for v in row))
    console.print(table)


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
