"""The job's Ray Data chain, from a JobConfig to the output tables. The only module that knows the
order of the stages:

    shard URLs -> read_shard (flat_map, CPU) -> preprocess (CPU) -> InvertEditActor (actor pool, GPU)
    -> ScoreActor (actor pool) -> filter flags -> write_batch (CPU) -> per-shard summaries (driver)

Rows are one per input sample until the writer, which expands them into edits / sources / errors rows.
The driver counts each shard's rows as the writer reports them and writes the shard's completion
marker (OUTPUT/_shards/{shard_key}.json) once all of them are durable (`pipeline.output`). A rerun skips shards with a
marker and first deletes files left by shards without one, so it ends with the rows of an
uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable

import ray

from pipeline.config import JobConfig, ResourcesConfig, StageResources, spec_digest
from pipeline.errors import JobError
from pipeline.output import OutputStore, ShardTracker, write_manifest
from pipeline.stages.filter import filter_batch
from pipeline.stages.invert_edit import InvertEditActor
from pipeline.stages.preprocess import preprocess_batch
from pipeline.stages.read import expand_shards, read_shard
from pipeline.stages.rows import SHARD
from pipeline.stages.score import ScoreActor
from pipeline.stages.write import remove_shard_files, shard_key, write_batch

logger = logging.getLogger(__name__)

# The stages run as actor pools (ActorPoolStrategy); the other stages of ResourcesConfig run as tasks.
ACTOR_STAGES = ("invert_edit", "score")


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


def stage_resources(resources: ResourcesConfig) -> dict[str, StageResources]:
    """Every stage's resources by stage name: the StageResources fields of ResourcesConfig."""
    stages = {field.name: getattr(resources, field.name) for field in dataclasses.fields(resources)}
    return {name: stage for name, stage in stages.items() if isinstance(stage, StageResources)}


def resource_shortfall(resources: ResourcesConfig, cluster: dict[str, float]) -> str | None:
    """Why the job's stages cannot all run at once on `cluster` (ray.cluster_resources()), or None.

    Actor pools (ACTOR_STAGES) hold their CPUs and GPUs for the whole job; the task stages (every other
    stage of ResourcesConfig) need what is left. If the pools take every CPU, no read task is ever
    scheduled and the job waits forever.
    """
    stages = stage_resources(resources)
    pools = {name: stage for name, stage in stages.items() if name in ACTOR_STAGES}
    tasks = {name: stage for name, stage in stages.items() if name not in ACTOR_STAGES}
    for unit, field_name in (("CPU", "num_cpus"), ("GPU", "num_gpus")):
        held = sum(stage.actors * getattr(stage, field_name) for stage in pools.values())
        task_name, task = max(tasks.items(), key=lambda item: getattr(item[1], field_name))
        needed = held + getattr(task, field_name)
        available = float(cluster.get(unit, 0.0))
        if needed > available + 1e-9:
            pool_terms = " + ".join(
                f"resources.{name}: {stage.actors} x {getattr(stage, field_name)}"
                for name, stage in pools.items()
            )
            return (
                f"the actor pools hold {held:g} {unit} ({pool_terms}) and resources.{task_name}.{field_name} "
                f"needs {getattr(task, field_name):g} more, but the cluster has {available:g} {unit}; lower "
                f"the pools' actors or {field_name}, or run on a bigger cluster"
            )
    return None


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


def build_dataset(
    config: JobConfig, shards: list[str], image_size: int, limit: int | None = None
) -> ray.data.Dataset:
    """The chain from shard URLs to per-shard write summaries (lazy; nothing runs yet)."""
    resources = config.resources
    dataset = ray.data.from_items(
        [{SHARD: shard} for shard in shards], override_num_blocks=max(1, len(shards))
    )
    dataset = dataset.flat_map(
        read_shard, fn_kwargs={"fields": config.input.fields}, num_cpus=resources.read.num_cpus
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
        fn_constructor_kwargs={
            "model_path": config.model.path,
            "device": config.model.device,
            "dtype": config.model.dtype,
            "inversion": config.inversion,
            "edits": config.edits,
            "metrics": config.metrics,
            "edit_batch_size": resources.edit_batch_size,
        },
        batch_format="numpy",
        **_actor_args(resources.invert_edit),
    )
    dataset = dataset.map_batches(
        ScoreActor,
        fn_constructor_kwargs={"metrics": config.metrics},
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


def run_job(
    config: JobConfig,
    *,
    limit: int | None = None,
    overwrite: bool = False,
    address: str | None = None,
    on_shard_complete: Callable[[str], None] | None = None,
) -> dict:
    """Run a job to completion and return its manifest (also written to OUTPUT/manifest.json).

    Args:
        config: the job spec.
        limit: process at most this many input samples (taken in shard order); shards cut short stay
            incomplete and are redone by the next run.
        overwrite: delete the output first.
        address: Ray address to join; None joins RAY_ADDRESS or starts a local Ray.
        on_shard_complete: called with each shard URL whose marker was written.
    """
    started = time.time()
    store = OutputStore(config.output.path)
    if overwrite:
        store.reset()
    store.claim(spec_digest(config))
    shards = expand_shards(config.input.shards)
    done_before = store.markers()
    pending = [shard for shard in shards if shard not in done_before]
    for shard in pending:
        remove_shard_files(config.output.path, shard_key(shard))

    if not ray.is_initialized():
        ray.init(address=address)
    shortfall = resource_shortfall(config.resources, ray.cluster_resources())
    if shortfall is not None:
        # A cluster that autoscales may still grow into the job; a fixed one would wait forever.
        if address is None and not os.environ.get("RAY_ADDRESS"):
            raise JobError(f"{config.name}: {shortfall}")
        logger.warning("%s: %s (waiting for the autoscaler)", config.name, shortfall)
    tracker = ShardTracker(store, on_shard_complete)
    if pending:
        context = ray.data.DataContext.get_current()
        preserve = context.execution_options.preserve_order
        context.execution_options.preserve_order = (
            limit is not None
        )  # "the first N samples" must be well defined
        try:
            dataset = build_dataset(config, pending, model_image_size(config), limit)
            for summary in dataset.iter_rows():
                tracker.add(summary)
        finally:
            context.execution_options.preserve_order = preserve
    return write_manifest(config, store, shards, tracker, started, len(done_before))
