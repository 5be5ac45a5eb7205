"""Training job specs (`inversa train SPEC.yaml`): what to train, where, and how it runs on Ray Train.

    kind: diffusion_clip          # the trained thing; its settings sit under the key of the same name
    name: shapes-star
    output: out/editors/star      # folder or URI: checkpoints (OUTPUT/train) and the artefact (OUTPUT/artefact)
    run: {iterations: 300, checkpoint_every: 25, workers: 1, use_gpu: false, threads: 1}
    diffusion_clip: {...}         # pipeline.training.diffusion_clip.DiffusionClipConfig

Unknown keys, missing keys and wrong types are `ConfigError`s naming the file and the dotted key, as
for augmentation specs. A spec is told apart from an augmentation spec by its `kind` key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, apply_override, build_dataclass, load_raw

# kind -> (config class path, task factory)
TASKS: dict[str, tuple[str, str]] = {
    "diffusion_clip": (
        "pipeline.training.diffusion_clip:DiffusionClipConfig",
        "pipeline.training.diffusion_clip:build_task",
    ),
    "zip_encoder": (
        "pipeline.training.zip_encoder:ZipEncoderConfig",
        "pipeline.training.zip_encoder:build_task",
    ),
    "cond_vae": (
        "pipeline.training.cond_vae:CondVAEConfig",
        "pipeline.training.cond_vae:build_task",
    ),
    "null_text_vae": (
        "pipeline.training.null_text_vae:NullTextVAEConfig",
        "pipeline.training.null_text_vae:build_task",
    ),
}


@dataclass(frozen=True)
class RunSpec:
    """How the training runs.

    Attributes:
        iterations: iterations in all (a resumed run continues up to it).
        checkpoint_every: iterations between checkpoints.
        workers: Ray Train workers (data-parallel); the task's batch must be a multiple of it.
        use_gpu: one GPU per worker.
        threads: torch threads per worker.
    """

    iterations: int
    checkpoint_every: int = 10
    workers: int = 1
    use_gpu: bool = False
    threads: int = 1


@dataclass(frozen=True)
class TrainSpec:
    """A whole training spec.

    Attributes:
        kind: the trained thing (a key of TASKS).
        name: a label.
        output: folder or URI of checkpoints and the artefact.
        run: the Ray Train settings.
        task: the kind's own config dataclass.
    """

    kind: str
    name: str
    output: str
    run: RunSpec
    task: Any

    @property
    def factory(self) -> str:
        return TASKS[self.kind][1]

    @property
    def artefact_uri(self) -> str:
        from pipeline.training.ray_train import ARTEFACT_FOLDER

        return f"{self.output.rstrip('/')}/{ARTEFACT_FOLDER}"

    def task_mapping(self) -> dict[str, Any]:
        return dataclasses.asdict(self.task)


def is_training_spec(data: dict) -> bool:
    """Whether a raw spec is a training spec (it has a `kind`)."""
    return isinstance(data, dict) and "kind" in data


def _config_class(kind: str) -> type:
    import importlib

    module, name = TASKS[kind][0].split(":")
    return getattr(importlib.import_module(module), name)


def parse_train_spec(data: dict, origin: str = "<training spec>") -> TrainSpec:
    """Build and check a TrainSpec from a raw mapping."""
    kind = data.get("kind")
    if kind not in TASKS:
        raise ConfigError(f"{origin}: kind: {kind!r} is not a trainable kind; choose one of {sorted(TASKS)}")
    allowed = {"kind", "name", "output", "run", kind}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"{origin}: {unknown[0]}: unknown key; allowed keys here are {sorted(allowed)}")
    for key in ("name", "output", "run"):
        if key not in data:
            raise ConfigError(f"{origin}: {key}: is required")
    for key in ("name", "output"):
        if not isinstance(data[key], str) or not data[key]:
            raise ConfigError(f"{origin}: {key}: expected a non-empty string, got {data[key]!r}")
    run = build_dataclass(RunSpec, data["run"], origin, "run")
    if run.iterations < 1 or run.checkpoint_every < 1 or run.workers < 1 or run.threads < 1:
        raise ConfigError(f"{origin}: run: iterations, checkpoint_every, workers and threads must be >= 1")
    task = build_dataclass(_config_class(kind), data.get(kind, {}), origin, kind)
    batch = getattr(task, "batch", None)
    if batch is not None and batch % run.workers:
        raise ConfigError(
            f"{origin}: {kind}.batch: {batch} is not a multiple of run.workers={run.workers}; "
            "every worker takes an equal share of each batch"
        )
    return TrainSpec(kind=kind, name=data["name"], output=data["output"], run=run, task=task)


def load_train_spec(path: str | Path, overrides: Sequence[str] = (), output: str | None = None) -> TrainSpec:
    """Read a training spec (or `env:NAME`), apply `--set` overrides and `--output`, and check it."""
    data = load_raw(path)
    for assignment in overrides:
        apply_override(data, assignment)
    if output is not None:
        data["output"] = output
    return parse_train_spec(data, str(path))


def with_local_paths_resolved(spec: TrainSpec, base: Path | None = None) -> TrainSpec:
    """The spec with a relative output folder and the task's relative file paths made absolute against
    `base` (default: the working folder), since Ray Train workers run in other folders."""
    base = Path.cwd() if base is None else base
    output = spec.output
    if "://" not in output:
        output = str((base / output).resolve())
    task = spec.task
    if hasattr(task, "with_absolute_paths"):
        task = task.with_absolute_paths(base)
    return dataclasses.replace(spec, output=output, task=task)


def to_mapping(spec: TrainSpec) -> dict[str, Any]:
    """The YAML form of a spec (what `inversa submit` hands to the cluster)."""
    return {
        "kind": spec.kind,
        "name": spec.name,
        "output": spec.output,
        "run": dataclasses.asdict(spec.run),
        spec.kind: spec.task_mapping(),
    }
