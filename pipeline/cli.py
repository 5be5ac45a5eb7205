"""`inversa` command line: run | train | validate | submit | status | logs | query | report | export.

    inversa run jobs/example_local.yaml --output out/ --set inversion.num_steps=10
    inversa train jobs/train_diffusion_clip_star.yaml --set run.workers=2
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


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print one line saying what is wrong and how to fix it; the Exit to raise (code 2: bad input)."""
    console.print(f"[red]error:[/red] {message}", soft_wrap=True, highlight=False)
    return typer.Exit(code)


def _load(job: Path | str, overrides: list[str] | None, output: str | None = None):
    try:
        return load_config(job, overrides or (), output)
    except ConfigError as error:
        console.print(f"[red]invalid job spec:[/red] {error}", soft_wrap=True, highlight=False)
        raise typer.Exit(2) from error


def _durable(config, *, where: str):
    """The config with output.path absolute (a relative one said so), or exit: memory:// is refused."""
    import dataclasses

    from pipeline.errors import JobError
    from pipeline.preflight import durable_output

    try:
        resolved = durable_output(config.output.path)
    except JobError as error:
        raise fail(f"output.path: {error}") from error
    if resolved != config.output.path and where == "submit":
        console.print(
            f"output: relative path {config.output.path!r} resolved to {resolved!r}; the cluster writes "
            "there, so it must be a path the cluster's nodes share (prefer an absolute path or s3:// URL)",
            soft_wrap=True,
            highlight=False,
        )
    return dataclasses.replace(config, output=dataclasses.replace(config.output, path=resolved))


def summary_table(manifest: dict) -> Table:
    """The end-of-run summary: counts and times from the manifest."""
    table = Table(title=f"inversa: {manifest['name']}")
    table.add_column("what")
    table.add_column("value", justify="right")
    for name, value in manifest["counts"].items():
        table.add_row(name, str(value))
    shards = manifest["shards"]
    table.add_row("status", manifest["status"])
    table.add_row("shards complete", f"{len(shards['complete'])}/{shards['total']}")
    table.add_row("shards failed", str(len(shards["failed"])))
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
    """Run a job; reruns resume, skipping completed shards and retrying failed ones.

    Exit code 0: every shard complete (or a --limit reached); 1: partial, shards failed after their
    retries (named in manifest.json; a rerun retries them); 2: the job could not start (bad input).
    """
    config = _durable(_load(job, set_, output), where="run")
    manifest = _run(config, limit, overwrite, address)
    console.print(summary_table(manifest))
    console.print(f"output: {config.output.path}", soft_wrap=True, highlight=False)
    _exit_for(manifest, limit)


def _run(config, limit: int | None, overwrite: bool, address: str | None) -> dict:
    """run_job with the pre-flight factory checks; a job that cannot start is one line, exit 2."""
    import sys

    from pipeline.dataflow import JobError, run_job
    from pipeline.preflight import editor_problems, factory_problems

    problems = factory_problems(config) + editor_problems(config)
    if problems:
        raise fail("; ".join(problems))
    # Without a terminal (logs, CI) one progress line per interval replaces Ray's progress bars.
    progress = None if sys.stdout.isatty() else (lambda line: print(line, flush=True))
    try:
        return run_job(config, limit=limit, overwrite=overwrite, address=address, progress=progress)
    except JobError as error:
        raise fail(str(error)) from error


def _exit_for(manifest: dict, limit: int | None) -> None:
    """Exit 1 when shards failed (status partial); a limit that left shards to do is said, exit 0."""
    failed = manifest["shards"]["failed"]
    if failed:
        first = next(iter(failed))
        console.print(
            f"[red]partial:[/red] {len(failed)} shard(s) failed after their retries (e.g. {first}: "
            f"{failed[first][0]}); they are listed in manifest.json and a rerun retries them",
            soft_wrap=True,
            highlight=False,
        )
        raise typer.Exit(1)
    if manifest["status"] == "partial" and limit is not None:
        console.print(f"limit {limit} reached: rerun without --limit to process the rest (it resumes)")


@app.command()
def train(
    spec: str = typer.Argument(..., help="Training spec YAML (or env:NAME to read it from a variable)."),
    output: str | None = typer.Option(None, help="Output URI (overrides the spec's output)."),
    address: str | None = typer.Option(
        None, help="Ray address to join (default: RAY_ADDRESS or a local Ray)."
    ),
    set_: list[str] | None = SetOption,
) -> None:
    """Train an artefact with Ray Train (e.g. a DiffusionCLIP editor); a rerun with the same output
    resumes from the last checkpoint. Writes OUTPUT/artefact (weights, config, metrics, base-model
    fingerprint) for augmentation specs to reference by URI."""
    import json

    spec_config = _load_train(spec, set_, output)
    manifest = _train(spec_config, address)
    metrics = manifest["metrics"]
    console.print(
        f"trained {spec_config.kind} {spec_config.name!r}: {metrics['iterations']} iterations, "
        f"{metrics['train_wall_s']} s on {metrics['workers']} worker(s), final {json.dumps(metrics['final'])}",
        soft_wrap=True,
        highlight=False,
    )
    console.print(
        f"artefact: {spec_config.artefact_uri} (version {manifest['version'][:12]})", highlight=False
    )


def _load_train(spec: str, overrides: list[str] | None, output: str | None = None):
    from pipeline.training.spec import load_train_spec

    try:
        return load_train_spec(spec, overrides or (), output)
    except ConfigError as error:
        console.print(f"[red]invalid training spec:[/red] {error}", soft_wrap=True, highlight=False)
        raise typer.Exit(2) from error


def _train(spec_config, address: str | None) -> dict:
    """run_training in a Ray it starts (or joins), stopped again if started here."""
    import ray

    from pipeline.training.ray_train import RunSettings, run_training
    from pipeline.training.spec import with_local_paths_resolved

    try:
        spec_config = with_local_paths_resolved(spec_config)
    except ConfigError as error:
        console.print(f"[red]invalid training spec:[/red] {error}", soft_wrap=True, highlight=False)
        raise typer.Exit(2) from error
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=True)
    try:
        run = spec_config.run
        settings = RunSettings(
            output=spec_config.output,
            iterations=run.iterations,
            checkpoint_every=run.checkpoint_every,
            workers=run.workers,
            use_gpu=run.use_gpu,
            threads=run.threads,
        )
        return run_training(spec_config.factory, spec_config.task_mapping(), settings)
    finally:
        if started_here:
            ray.shutdown()


@app.command()
def validate(
    job: Path = typer.Argument(...),
    set_: list[str] | None = SetOption,
    spec_only: bool = typer.Option(
        False,
        help="Check only the spec, not its shards, model, backbones, factories or resources "
        "(for a cluster spec checked on a machine that cannot see the cluster's data).",
    ),
) -> None:
    """Check a job before running it: the spec, then that its shards resolve (and how many), the model
    folder's configs and weight files, the metric backbones, the factories it names, and that its
    resources fit this machine. Prints the resolved spec; exit 2 with one line per problem."""
    import yaml

    config = _load(job, set_)
    console.print(yaml.safe_dump(to_dict(config), sort_keys=False), highlight=False)
    if not spec_only:
        _validate_deep(config)
    console.print(f"[green]{job}: valid[/green]")


def _validate_deep(config) -> None:
    """Print the shard count and every problem of the job's pre-flight checks; exit 2 on any."""
    from pipeline.preflight import job_problems, local_resources

    cluster = local_resources()
    shards, problems = job_problems(config, cluster)
    console.print(f"shards: {len(shards)} found for {list(config.input.shards)}", highlight=False)
    console.print(f"resources checked against this machine: {cluster['CPU']:g} CPU, {cluster['GPU']:g} GPU")
    for problem in problems:
        console.print(f"[red]error:[/red] {problem}", soft_wrap=True, highlight=False)
    if problems:
        console.print(f"{len(problems)} problem(s); fix them, or pass --spec-only to check only the spec")
        raise typer.Exit(2)


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    return _jobs_api(address, "", lambda: JobSubmissionClient(address))


TOKEN_FIX = (
    "the cluster uses token auth: export RAY_AUTH_MODE=token and its token as RAY_AUTH_TOKEN (or the "
    "file RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token); on the head node `ray get-auth-token` prints it"
)


def _jobs_api(address: str, submission_id: str, call):
    """call() against the Jobs API, with its expected failures as one line (exit 2)."""
    from ray.exceptions import AuthenticationError

    try:
        return call()
    except (AuthenticationError, ConnectionError, RuntimeError) as error:
        raise fail(_jobs_api_problem(address, submission_id, error)) from error


def _jobs_api_problem(address: str, submission_id: str, error: Exception) -> str:
    """One line for an expected Jobs API failure: token, unreachable address, unknown id."""
    from ray.exceptions import AuthenticationError

    message = _first_line(str(error))
    if isinstance(error, AuthenticationError) or _is_auth_error(str(error)):
        return f"the Ray dashboard at {address} did not accept this client's token ({message}); {TOKEN_FIX}"
    if isinstance(error, ConnectionError):
        return (
            f"cannot reach the Ray dashboard at {address} ({message}); check --address "
            "(http://HEAD:8265) and that the cluster is up"
        )
    if "404" in str(error) or "does not exist" in str(error):
        return (
            f"no job with submission id {submission_id!r} at {address}; `ray job list --address {address}` "
            "lists the ids"
        )
    return f"the Ray Jobs API at {address} failed: {message}"


def _is_auth_error(message: str) -> bool:
    lowered = message.lower()
    return any(
        word in lowered
        for word in ("401", "403", "unauthorized", "unauthenticated", "auth token", "authentication")
    )


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0][:300] if message.strip() else "no message"


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
    """Submit `inversa run` (or `inversa train`, for a training spec) to a Ray cluster through the Jobs
    API; prints the submission id.

    The spec is resolved here (--set, --output applied, checked) and handed to the job in the
    runtime_env, so the cluster runs exactly what was validated. Relative paths inside it are
    resolved on the cluster, relative to the uploaded working_dir; prefer absolute URLs.
    """
    import yaml

    from pipeline.training.spec import is_training_spec, to_mapping

    if is_training_spec(_raw_or_exit(job)):
        spec_config = _load_train(str(job), set_, output)  # fail here, not on the cluster
        arguments = ["python", "-m", "pipeline.cli", "train", f"env:{SPEC_VARIABLE}"]
        spec_text = yaml.safe_dump(to_mapping(spec_config), sort_keys=False)
    else:
        config = _durable(_load(job, set_, output), where="submit")  # fail here, not on the cluster
        arguments = ["python", "-m", "pipeline.cli", "run", f"env:{SPEC_VARIABLE}"]
        arguments += ["--limit", str(limit)] if limit is not None else []
        arguments += ["--overwrite"] if overwrite else []
        spec_text = yaml.safe_dump(to_dict(config), sort_keys=False)
    runtime_env = {
        "working_dir": str((working_dir or project_root()).resolve()),
        "excludes": [".git", "**/__pycache__", "out", ".cache", "*.egg-info"],
        "env_vars": {SPEC_VARIABLE: spec_text},
    }
    client = _client(address)
    submission_id = _jobs_api(
        address, "", lambda: client.submit_job(entrypoint=shlex.join(arguments), runtime_env=runtime_env)
    )
    print(submission_id)


def _raw_or_exit(job: Path) -> dict:
    from pipeline.config import load_raw

    try:
        return load_raw(job)
    except ConfigError as error:
        raise fail(str(error)) from error


@app.command()
def status(submission_id: str, address: str = typer.Option(..., help="Ray dashboard address.")) -> None:
    """Print a submitted job's status."""
    client = _client(address)
    print(_jobs_api(address, submission_id, lambda: client.get_job_status(submission_id)).value)


@app.command()
def logs(submission_id: str, address: str = typer.Option(..., help="Ray dashboard address.")) -> None:
    """Print a submitted job's logs."""
    client = _client(address)
    print(_jobs_api(address, submission_id, lambda: client.get_job_logs(submission_id)))


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

    import duckdb

    from pipeline.report import BINARY_RENDERINGS, QUERY_FORMATS, connect, write_result

    if format_ not in QUERY_FORMATS or binary not in BINARY_RENDERINGS:
        raise fail(
            f"--format {format_} --binary {binary}: use --format {'|'.join(QUERY_FORMATS)} "
            f"and --binary {'|'.join(BINARY_RENDERINGS)}"
        )
    _require_output(output)
    try:
        result = connect(output).sql(sql)
    except duckdb.Error as error:
        raise fail(f"query failed: {_first_line(str(error))} (tables: edits, sources, errors)") from error
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
        raise fail(f"export: {error}") from error
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

    _require_output(output)
    print(write_report(output, path, max_sources))


def _require_output(output: str) -> None:
    """Exit 2 unless `output` is a folder an inversa job wrote (its manifest or shard markers)."""
    from pipeline.output import OutputStore

    try:
        found = OutputStore(output).is_inversa_output()
    except (OSError, ValueError) as error:
        raise fail(f"cannot read {output}: {_first_line(str(error))}") from error
    if not found:
        raise fail(
            f"{output} is not an inversa output (no manifest.json or _shards/); give the output.path "
            "of a job that `inversa run` has written"
        )


if __name__ == "__main__":
    app()
