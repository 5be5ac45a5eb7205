"""Training as a Ray Train job: data-parallel workers, checkpoints under the output URI, resume, artefact.

Every trained thing (DiffusionCLIP editors, ZIP attribute encoders, conditional-embedding and null-text
VAEs) is a `TrainTask`: a class built on each worker from its config that takes one iteration at a time.
`run_training` runs it with Ray Train's `TorchTrainer`:

    OUTPUT/train/...          Ray Train's run folder: checkpoint_* (the task's state + iteration +
                              loss history) and the controller's snapshot, through which a rerun with
                              the same OUTPUT resumes from the last checkpoint
    OUTPUT/artefact/          the artefact (`pipeline.training.artefact`), written by rank 0 at the end

Data parallelism: iteration i's batch is drawn from a seed that depends only on (seed, i); worker r of
W takes rows r, r + W, ... of it, computes the mean loss over its rows, and the task calls `sync` before
each optimiser step, which averages the gradients over the workers (all-reduce). With equal shares
per worker this is the gradient of the whole batch, so W workers follow the one-worker run's loss
curve up to float summation order. CPU workers use gloo; GPU workers (use_gpu) NCCL.

Randomness of an iteration depends only on its index, and a checkpoint holds the trained weights and
the optimiser state, so a run killed after a checkpoint and resumed ends where an uninterrupted run does.
"""

from __future__ import annotations

import importlib
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

RUN_NAME = "train"
ARTEFACT_FOLDER = "artefact"
STATE_NAME = "state.pt"


class TrainTask(Protocol):
    """What the runner needs from a trained thing (built on every worker by its factory)."""

    kind: str

    def setup(self, device: torch.device, rank: int, world_size: int) -> None:
        """Build the model, optimiser and data on this worker."""

    def step(self, iteration: int, sync: Callable[[], None]) -> dict[str, float]:
        """One iteration: backward pass(es), `sync()` before each optimiser step; returns local metrics."""

    def trained_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters whose gradients `sync` averages."""

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs (weights and optimiser state)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`."""

    def artefact(self) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
        """(weights, JSON config, base-model fingerprint) of the finished artefact."""


class VAETaskState:
    """`trained_parameters`, `state_dict`, `load_state_dict` and the artefact's weights of a task that
    trains one module, `self.vae`, with `self.optimizer` (the embedding-VAE tasks)."""

    def trained_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.vae.parameters())

    def state_dict(self) -> dict[str, Any]:
        weights = {name: tensor.detach().clone() for name, tensor in self.vae.state_dict().items()}
        return {"weights": weights, "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.vae.load_state_dict(state["weights"])
        self.optimizer.load_state_dict(state["optimizer"])

    def vae_weights(self) -> dict[str, torch.Tensor]:
        """The VAE's tensors on the CPU, for the artefact."""
        return {name: tensor.detach().cpu().clone() for name, tensor in self.vae.state_dict().items()}


@dataclass(frozen=True)
class RunSettings:
    """How a task runs on Ray Train.

    Attributes:
        output: the output folder or URI (checkpoints and the artefact).
        iterations: iterations in all (a resumed run continues up to it).
        checkpoint_every: iterations between checkpoints (the last iteration always checkpoints).
        workers: Ray Train workers (data-parallel).
        use_gpu: one GPU per worker.
        threads: torch threads per worker.
    """

    output: str
    iterations: int
    checkpoint_every: int = 10
    workers: int = 1
    use_gpu: bool = False
    threads: int = 1


def build_task(factory: str, config: dict[str, Any]) -> TrainTask:
    """`package.module:function` called with the task's config mapping."""
    module, name = factory.split(":", 1)
    return getattr(importlib.import_module(module), name)(config)


def average_gradients(parameters: list[torch.nn.Parameter], world_size: int) -> None:
    """All-reduce the gradients to their mean over the workers (nothing to do for one worker)."""
    if world_size == 1:
        return
    import torch.distributed as dist

    for parameter in parameters:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
        dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM)
        parameter.grad /= world_size


def mean_over_workers(metrics: dict[str, float], world_size: int) -> dict[str, float]:
    """Each metric averaged over the workers (every worker passes the same keys)."""
    if world_size == 1:
        return dict(metrics)
    import torch.distributed as dist

    names = sorted(metrics)
    values = torch.tensor([float(metrics[name]) for name in names], dtype=torch.float64)
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return {name: float(value) / world_size for name, value in zip(names, values.tolist(), strict=True)}


def _restore(task: TrainTask) -> tuple[int, list[dict[str, float]], float]:
    """(next iteration, loss history, wall seconds so far) from Ray Train's latest checkpoint."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, [], 0.0
    with checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / STATE_NAME, weights_only=False)
    task.load_state_dict(state["task"])
    return state["iteration"], state["history"], state["wall_s"]


def _report(task: TrainTask, rank: int, iteration: int, history: list, wall_s: float, save: bool) -> None:
    """ray.train.report on every worker; rank 0 attaches the checkpoint when `save`."""
    import ray.train

    metrics = {"iteration": iteration, **history[-1]}
    if not save or rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as folder:
        state = {"task": task.state_dict(), "iteration": iteration, "history": history, "wall_s": wall_s}
        torch.save(state, Path(folder) / STATE_NAME)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """The function every Ray Train worker runs: restore, iterate, checkpoint, write the artefact."""
    import ray.train

    torch.set_num_threads(loop_config["threads"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    task = build_task(loop_config["factory"], loop_config["config"])
    device = torch.device(f"cuda:{context.get_local_rank()}" if loop_config["use_gpu"] else "cpu")
    task.setup(device, rank, world_size)
    start, history, wall_s = _restore(task)
    interrupt = loop_config.get("interrupt_after")
    parameters = task.trained_parameters()
    for iteration in range(start, loop_config["iterations"]):
        started = time.perf_counter()
        with torch.enable_grad():  # whatever mode the worker process was left in
            local = task.step(iteration, lambda: average_gradients(parameters, world_size))
        history.append(mean_over_workers(local, world_size))
        wall_s += time.perf_counter() - started
        done = iteration + 1
        save = done % loop_config["checkpoint_every"] == 0 or done == loop_config["iterations"]
        _report(task, rank, done, history, wall_s, save)
        if interrupt is not None and done == interrupt:
            raise RuntimeError(f"interrupted after iteration {done} (interrupt_after)")
    if rank == 0:
        _write_artefact(task, loop_config["output"], history, wall_s, world_size, start)


def _write_artefact(
    task: TrainTask, output: str, history: list, wall_s: float, world_size: int, resumed_from: int
) -> None:
    from pipeline.training.artefact import write_artefact

    weights, config, fingerprint = task.artefact()
    metrics = {
        "iterations": len(history),
        "final": history[-1] if history else {},
        "history": history,
        "train_wall_s": round(wall_s, 1),
        "workers": world_size,
        "resumed_from": resumed_from,
    }
    write_artefact(
        f"{output.rstrip('/')}/{ARTEFACT_FOLDER}", task.kind, weights, config, metrics, fingerprint
    )


def storage_location(output: str):
    """(storage_path, storage_filesystem) for RunConfig: an absolute local path, or a URI through fsspec."""
    import fsspec

    if "://" not in output or output.startswith("file://"):
        return str(Path(output.removeprefix("file://")).resolve()), None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, root = fsspec.core.url_to_fs(output)
    return root, PyFileSystem(FSSpecHandler(fs))


def run_training(
    factory: str,
    config: dict[str, Any],
    settings: RunSettings,
    interrupt_after: int | None = None,
) -> dict[str, Any]:
    """Run (or resume) a task with Ray Train's TorchTrainer and return the artefact's JSON.

    Joins the Ray of the caller (`ray.init` already called) or starts a local one.

    Args:
        factory: `package.module:function` building the task from `config`.
        config: the task's JSON config (sent to every worker).
        settings: output, iterations, workers, checkpoint interval.
        interrupt_after: stop with an error right after this iteration's report (tests of resuming).

    Returns:
        The artefact's JSON (`OUTPUT/artefact/artefact.json`) and its "uri".

    Raises:
        ray.train.TrainingFailedError: a worker failed (rerun with the same output to resume).
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.training.artefact import read_manifest

    storage_path, filesystem = storage_location(settings.output)
    loop_config = {
        "factory": factory,
        "config": config,
        "iterations": settings.iterations,
        "checkpoint_every": settings.checkpoint_every,
        "threads": settings.threads,
        "use_gpu": settings.use_gpu,
        "output": settings.output,
        "interrupt_after": interrupt_after,
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=settings.workers, use_gpu=settings.use_gpu),
        run_config=ray.train.RunConfig(
            name=RUN_NAME,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": str(settings.threads)}},
        ),
    )
    trainer.fit()
    uri = f"{settings.output.rstrip('/')}/{ARTEFACT_FOLDER}"
    return read_manifest(uri) | {"uri": uri}


def history_of(manifest: dict[str, Any]) -> list[dict[str, float]]:
    """The per-iteration metrics an artefact recorded."""
    return manifest["metrics"]["history"]
