"""The job's Ray Data chain, from a JobConfig to the output tables. The only module that knows the
order of the stages:

    shard URLs -> read_shard (flat_map, CPU) -> preprocess (CPU) -> InvertEditActor (actor pool, GPU)
    -> ScoreActor (actor pool) -> filter flags -> write_batch (CPU) -> per-shard summaries (driver)

Rows are one per input sample until the writer, which expands them into edits / sources / errors rows.
The driver counts each shard's rows as the writer reports them and writes the shard's completion
marker (OUTPUT/_shards/{shard_key}.json) once all of them are durable (`pipeline.output`), unless the
shard could not be read whole (then it is recorded as failed and the manifest's status is "partial").
A rerun skips shards with a marker, resumes shards a limit cut short from their partial records, and
first deletes every other file left by shards without a marker, so it ends with the rows of an
uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable

import ray

from pipeline.config import JobConfig, ResourcesConfig, StageResources, spec_digest
from pipeline.errors import JobError
from pipeline.output import OutputStore, ShardTracker, write_manifest
from pipeline.preflight import durable_output, local_resources, resolve_shards, resource_shortfall
from pipeline.stages.filter import filter_batch
from pipeline.stages.invert_edit import InvertEditActor
from pipeline.stages.preprocess import preprocess_batch
from pipeline.stages.read import read_shard
from pipeline.stages.rows import SHARD
from pipeline.stages.score import ScoreActor
from pipeline.stages.write import remove_shard_files, shard_key, write_batch

logger = logging.getLogger(__name__)


def model_image_size(config: JobConfig) -> int:
    """model.image_size, or the side read from the model's unet and vae configs (no weights loaded)."""
    if config.model.image_size:
        return config.model.image_size
    from diffusers import AutoencoderKL, UNet2DConditionModel

    try:
        unet = UNet2DConditionModel.load_config(config.model.path, subfolder="unet")
        vae = AutoencoderKL.load_config(config.model.path, subfolder="vae")
    except OSError as error:
        raise JobError(
            f"model.path {config.model.path!r}: cannot read its unet/vae configs ({error}); set model.image_size"
        ) from error
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def _actor_args(stage: StageResources) -> dict:
    """map_batches arguments of an actor stage: pool size, batch size and per-actor resources."""
    pool = ray.data.ActorPoolStrategy(min_size=stage.actors, max_size=stage.max_actors or stage.actors)
    return {
        "compute": pool,
        "batch_size": stage.batch_size,
        "num_gpus": stage.num_gpus,
        "num_cpus": stage.num_cpus,
    }


def _task_args(stage: StageResources) -> dict:
    return {"batch_size": stage.batch_size, "num_gpus": stage.num_gpus, "num_cpus": stage.num_cpus}


def invert_edit_arguments(config: JobConfig) -> dict:
    """The invert/edit actor's constructor arguments, from the job spec."""
    return {
        "model_path": config.model.path,
        "device": config.model.device,
        "dtype": config.model.dtype,
        "precision": config.model.precision,
        "inversion": config.inversion,
        "edits": config.edits,
        "metrics": config.metrics,
        "edit_batch_size": config.resources.edit_batch_size,
    }


def build_dataset(
    config: JobConfig,
    shards: list[str],
    image_size: int,
    limit: int | None = None,
    resumed: dict[str, dict] | None = None,
) -> ray.data.Dataset:
    """The chain from shard URLs to per-shard write summaries (lazy; nothing runs yet).

    `resumed` (shard URL -> partial record) names the rows already durable, which the reader leaves out.
    """
    resources = config.resources
    dataset = ray.data.from_items(
        [{SHARD: shard} for shard in shards], override_num_blocks=max(1, len(shards))
    )
    dataset = dataset.flat_map(
        read_shard,
        fn_kwargs={
            "fields": config.input.fields,
            "retry": config.input.retry,
            "written": {shard: record["source_ids"] for shard, record in (resumed or {}).items()},
        },
        num_cpus=resources.read.num_cpus,
    )
    if limit is not None:
        dataset = dataset.limit(limit)
    dataset = dataset.map_batches(
        preprocess_batch,
        fn_kwargs={"image_size": image_size},
        batch_format="numpy",
        **_task_args(resources.preprocess),
    )
    dataset = dataset.map_batches(
        InvertEditActor,
        fn_constructor_kwargs=invert_edit_arguments(config),
        batch_format="numpy",
        **_actor_args(resources.invert_edit),
    )
    dataset = dataset.map_batches(
        ScoreActor,
        fn_constructor_kwargs={"metrics": config.metrics, "output": config.output},
        batch_format="numpy",
        **_actor_args(resources.score),
    )
    # Same resources as the writer, so Ray fuses the two into one task.
    dataset = dataset.map_batches(
        filter_batch,
        fn_kwargs={"thresholds": config.filter},
        batch_format="numpy",
        **_task_args(resources.write),
    )
    return dataset.map_batches(
        write_batch,
        fn_kwargs={"output": config.output.path},
        batch_format="numpy",
        **_task_args(resources.write),
    )


def _check_shards(config: JobConfig) -> list[str]:
    """The job's shard URLs; JobError when none is found, a warning for each one missing (it will be
    retried, then recorded as failed)."""
    shards, missing = resolve_shards(config.input.shards)
    if len(missing) >= len(shards):
        raise JobError(
            f"{config.name}: input.shards: no shard found for {list(config.input.shards)}; check the paths "
            "(`inversa validate` lists what resolves)"
        )
    for url in missing:
        logger.warning("%s: shard %s not found; it will be retried and recorded as failed", config.name, url)
    return shards


def _check_resources(config: JobConfig, address: str | None) -> None:
    """Start or join Ray, after refusing a local job whose stages cannot all run at once."""
    local = address is None and not os.environ.get("RAY_ADDRESS") and not ray.is_initialized()
    if local:
        shortfall = resource_shortfall(config.resources, local_resources())
        if shortfall is not None:
            raise JobError(f"{config.name}: {shortfall}")
    if not ray.is_initialized():
        ray.init(address=address)
    shortfall = resource_shortfall(config.resources, ray.cluster_resources())
    if shortfall is not None:
        # A cluster that autoscales may still grow into the job; a fixed one would wait forever.
        if address is None and not os.environ.get("RAY_ADDRESS"):
            raise JobError(f"{config.name}: {shortfall}")
        logger.warning("%s: %s (waiting for the autoscaler)", config.name, shortfall)


def _prepare_output(config: JobConfig, shards: list[str], overwrite: bool) -> tuple[OutputStore, dict, dict]:
    """Reset (with --overwrite) and claim the output; remove the files of shards left unfinished.

    Returns:
        (the store, markers of shards complete before this run, partial records of shards a limit cut
        short, whose durable files are kept).
    """
    store = OutputStore(config.output.path)
    if overwrite:
        store.reset()
    store.claim(spec_digest(config))
    done_before = store.markers()
    resumed = {shard: record for shard, record in store.partials().items() if shard not in done_before}
    for shard in shards:
        if shard not in done_before:
            keep = frozenset(resumed.get(shard, {}).get("files", ()))
            remove_shard_files(config.output.path, shard_key(shard), keep)
    return store, done_before, resumed


class ProgressLine:
    """One line per interval for a terminal-less run (logs, CI): shards done, rows, images per second.

    Args:
        total: shards of the job.
        skipped: shards complete before this run.
        emit: where a line goes.
        interval: seconds between lines.
    """

    def __init__(self, total: int, skipped: int, emit: Callable[[str], None], interval: float):
        self.total, self.skipped, self.emit, self.interval = total, skipped, emit, interval
        self.started = self.last = time.monotonic()

    def line(self, tracker: ShardTracker) -> str:
        done = self.skipped + len(tracker.completed)
        images = sum(total["rows"] for total in tracker.totals.values())
        rate = images / max(time.monotonic() - self.started, 1e-9)
        failed = f", {len(tracker.failed)} failed" if tracker.failed else ""
        return f"shards done {done}/{self.total}{failed}, samples {images}, {rate:.2f} images/s"

    def update(self, tracker: ShardTracker) -> None:
        if time.monotonic() - self.last >= self.interval:
            self.last = time.monotonic()
            self.emit(self.line(tracker))


def _quiet_progress_bars(context) -> dict:
    """Turn Ray Data's multi-line progress bars off; returns the settings to restore."""
    names = ("enable_progress_bars", "enable_operator_progress_bars", "enable_rich_progress_bars")
    saved = {name: getattr(context, name) for name in names if hasattr(context, name)}
    for name in saved:
        setattr(context, name, False)
    return saved


def stage_figures(dataset: ray.data.Dataset, resources: ResourcesConfig) -> list[dict]:
    """Per Ray Data operator of an executed dataset: rows out, seconds, rows/s, and for the actor pools
    the utilisation (busy seconds of all actors / (pool size x the operator's seconds))."""
    try:
        summary = dataset._get_stats_summary()  # the structured form of dataset.stats()
    except Exception:  # a private API: the text in ray_data_stats.txt still holds the figures
        logger.warning("Ray Data stats summary unavailable; see ray_data_stats.txt")
        return []
    chain = []
    while summary is not None:
        chain = list(summary.operators_stats) + chain
        summary = summary.parents[0] if summary.parents else None
    pools = {"InvertEditActor": resources.invert_edit, "ScoreActor": resources.score}
    figures = []
    for operator in chain:
        rows = int(operator.output_num_rows.sum) if operator.output_num_rows else 0
        seconds = float(operator.time_total_s or 0.0)
        busy = float(operator.wall_time.sum) if operator.wall_time else 0.0
        figure = {
            "operator": operator.operator_name,
            "output_rows": rows,
            "seconds": seconds,
            "rows_per_second": rows / seconds if seconds > 0 else None,
            "busy_seconds": busy,
        }
        pool = next((stage for name, stage in pools.items() if name in operator.operator_name), None)
        if pool is not None:
            actors = pool.max_actors or pool.actors
            figure["actors"] = actors
            figure["actor_utilisation"] = busy / (actors * seconds) if seconds > 0 else None
        figures.append(figure)
    return figures


@contextlib.contextmanager
def _execution_context(limit: int | None, quiet: bool):
    """Ray Data settings for the job's dataset, in force while it is built and run.

    A Dataset copies the current DataContext when it is created, so these are set before
    `build_dataset`: the order is kept when a limit asks for "the first N samples", and with `quiet`
    (a progress callback replaces them) Ray Data's progress bars and their multi-line non-TTY logging
    are off.
    """
    context = ray.data.DataContext.get_current()
    preserve = context.execution_options.preserve_order
    context.execution_options.preserve_order = limit is not None
    bars = _quiet_progress_bars(context) if quiet else {}
    try:
        yield
    finally:
        context.execution_options.preserve_order = preserve
        for name, value in bars.items():
            setattr(context, name, value)


def _execute(dataset: ray.data.Dataset, tracker: ShardTracker, progress: ProgressLine | None) -> None:
    """Run the chain, adding each writer summary to the tracker."""
    for summary in dataset.iter_rows():
        tracker.add(summary)
        if progress is not None:
            progress.update(tracker)


def run_job(
    config: JobConfig,
    *,
    limit: int | None = None,
    overwrite: bool = False,
    address: str | None = None,
    on_shard_complete: Callable[[str], None] | None = None,
    progress: Callable[[str], None] | None = None,
    progress_seconds: float = 10.0,
) -> dict:
    """Run a job and return its manifest (also written to OUTPUT/manifest.json).

    Every check (output durable, shards found, model configs, resources) runs before the output is
    touched, so `overwrite` never deletes anything for a job that cannot start.

    Args:
        config: the job spec.
        limit: process at most this many input samples (taken in shard order); a shard cut short keeps
            its written rows and the next run processes only the rest of it.
        overwrite: delete the output first (only an inversa output).
        address: Ray address to join; None joins RAY_ADDRESS or starts a local Ray.
        on_shard_complete: called with each shard URL whose marker was written.
        progress: called with one progress line per `progress_seconds` and at the end; Ray Data's
            progress bars are off while it is set (for runs without a terminal).
        progress_seconds: seconds between progress lines.

    Returns:
        The manifest; its `status` is "partial" when a shard failed or a limit left shards to do.
    """
    started = time.time()
    config = dataclasses.replace(
        config, output=dataclasses.replace(config.output, path=durable_output(config.output.path))
    )
    shards = _check_shards(config)
    image_size = model_image_size(config)
    _check_resources(config, address)
    store, done_before, resumed = _prepare_output(config, shards, overwrite)
    pending = [shard for shard in shards if shard not in done_before]
    tracker = ShardTracker(store, on_shard_complete, resumed)
    line = ProgressLine(len(shards), len(done_before), progress, progress_seconds) if progress else None
    figures = []
    if pending:
        with _execution_context(limit, quiet=line is not None):
            dataset = build_dataset(config, pending, image_size, limit, resumed)
            _execute(dataset, tracker, line)
        store.write_text("ray_data_stats.txt", dataset.stats())
        figures = stage_figures(dataset, config.resources)
    if line is not None:
        progress(line.line(tracker))
    return write_manifest(config, store, shards, tracker, started, len(done_before), figures)
