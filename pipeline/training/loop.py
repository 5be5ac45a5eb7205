"""The training loop every trained model shares.

A model's module builds its model, optimizer and data, then hands the loop a step function (one
batch -> loss) and a `Budget`:

    rng = seed_everything(config.seed + 1)
    budget = Budget(steps, max_minutes)
    last_loss = optimize(lambda: loss_of_one_batch(rng), optimizer, budget, stage="vae", peak_lr=lr)
    MetricsLog(output).record("vae", {"steps": budget.step, "wall_s": round(budget.elapsed), ...})

The pieces: seeding (`seed_everything`), the step/time budget with its learning-rate schedule
(`Budget`), the optimisation loop (`optimize`), checkpoints (`load_in_memory` reads saved weights off
their files, `replace_folder` swaps a saved folder whole, `Progress` carries the steps and wall time a
resumed model was already trained for) and the metrics record (`MetricsLog`, OUTPUT/train_metrics.json).
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

METRICS_NAME = "train_metrics.json"


def seed_everything(seed: int) -> np.random.Generator:
    """Seed torch's global generator and return a numpy generator with the same seed.

    Args:
        seed: the stage's seed.

    Returns:
        `np.random.default_rng(seed)`, for the stage's batch sampling.
    """
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def training_device() -> torch.device:
    """CUDA when available (the same job runs on a GPU), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Budget:
    """Stops a loop at `steps` or `max_minutes`; `progress` in [0, 1] is whichever is further along.

    Attributes:
        steps: the step budget.
        seconds: the wall-time budget.
        start: time.time() at construction.
        step: steps taken so far (the loop increments it).
    """

    def __init__(self, steps: int, max_minutes: float) -> None:
        self.steps, self.seconds, self.start, self.step = steps, max_minutes * 60.0, time.time(), 0

    @property
    def elapsed(self) -> float:
        """Seconds since the budget started."""
        return time.time() - self.start

    def progress(self) -> float:
        """max(step / steps, elapsed / seconds), capped at 1."""
        return min(1.0, max(self.step / self.steps, self.elapsed / self.seconds))

    def running(self) -> bool:
        """Whether neither budget is spent."""
        return self.progress() < 1.0

    def lr_factor(self, warmup_steps: int = 50) -> float:
        """Linear warm-up, then cosine decay to 5% over the budget.

        Args:
            warmup_steps: steps of the linear warm-up.

        Returns:
            The factor the peak learning rate is multiplied by at the current step.
        """
        warm = min(1.0, (self.step + 1) / warmup_steps)
        return warm * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * self.progress())))


def log_step(stage: str, budget: Budget, loss: float, every: int = 50) -> None:
    """Print the loss every `every` steps.

    Args:
        stage: the name printed.
        budget: the running budget (its step and elapsed time are printed).
        loss: the step's loss.
        every: print when budget.step is a multiple of it.
    """
    if budget.step % every == 0:
        print(f"[{stage}] step {budget.step} loss {loss:.5f} t={budget.elapsed:.0f}s", flush=True)


def optimize(
    loss_step: Callable[[], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    budget: Budget,
    *,
    stage: str,
    peak_lr: float,
    warmup_steps: int = 50,
    max_grad_norm: float | None = None,
    after_step: Callable[[int], None] | None = None,
    log_every: int = 50,
) -> float:
    """Take optimizer steps until the budget is spent.

    Each step: `loss = loss_step()` (it draws the batch and runs the model), every param group's
    learning rate set to `peak_lr * budget.lr_factor(warmup_steps)`, zero_grad, backward, optional
    gradient-norm clipping over the optimizer's parameters, optimizer.step, `budget.step += 1`, then
    `after_step(budget.step)` (e.g. an EMA update) and the log line.

    Args:
        loss_step: computes one batch's scalar loss; all randomness of a step happens in it.
        optimizer: the optimizer over the trained parameters.
        budget: the step/time budget; its `step` counts the steps taken.
        stage: the name in log lines.
        peak_lr: the learning rate the schedule scales.
        warmup_steps: steps of the linear warm-up.
        max_grad_norm: clip the gradients' total norm to it; None for no clipping.
        after_step: called with the step count after each optimizer step.
        log_every: log the loss every this many steps.

    Returns:
        The last step's loss (nan when the budget allowed no step).
    """
    parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
    last = float("nan")
    while budget.running():
        loss = loss_step()
        for group in optimizer.param_groups:
            group["lr"] = peak_lr * budget.lr_factor(warmup_steps)
        optimizer.zero_grad()
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
        optimizer.step()
        budget.step += 1
        if after_step is not None:
            after_step(budget.step)
        last = loss.item()
        log_step(stage, budget, last, every=log_every)
    return last


@dataclass(frozen=True)
class Progress:
    """How long a model has been trained, over every run that resumed it.

    Attributes:
        steps: optimizer steps.
        wall_s: wall seconds.
    """

    steps: int = 0
    wall_s: int = 0

    def after(self, budget: Budget) -> Progress:
        """This progress plus a finished run's steps and (rounded) wall seconds."""
        return Progress(self.steps + budget.step, self.wall_s + round(budget.elapsed))


class MetricsLog:
    """OUTPUT/train_metrics.json: one record of metrics per stage, rewritten whole on every change.

    Attributes:
        path: the JSON file.
    """

    def __init__(self, output: str | Path) -> None:
        self.path = Path(output) / METRICS_NAME

    def read(self) -> dict[str, dict]:
        """Every stage's record ({} when nothing was recorded yet)."""
        return json.loads(self.path.read_text()) if self.path.is_file() else {}

    def _write(self, records: dict[str, dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(records, indent=2, sort_keys=True))

    def record(self, stage: str, metrics: dict) -> None:
        """Store (replace) `stage`'s record and print it.

        Args:
            stage: the record's key.
            metrics: JSON-serialisable metrics.
        """
        records = self.read()
        records[stage] = metrics
        self._write(records)
        print(f"[{stage}] {json.dumps(metrics)}", flush=True)

    def forget(self, stage: str) -> None:
        """Drop `stage`'s record (e.g. its weights were made stale by another stage)."""
        records = self.read()
        if records.pop(stage, None) is not None:
            self._write(records)

    def progress(self, stage: str) -> Progress:
        """The training `stage`'s saved weights have had so far: its record's total_steps/total_wall_s
        (steps/wall_s for a record written without resuming; zero without a record)."""
        record = self.read().get(stage, {})
        return Progress(
            steps=int(record.get("total_steps", record.get("steps", 0))),
            wall_s=int(record.get("total_wall_s", record.get("wall_s", 0))),
        )


def load_in_memory(model_class, folder: Path):
    """`model_class.from_pretrained(folder)` with its weights copied off the file.

    safetensors maps the file into memory, and a stage may later write the same folder (a mapped file
    rewritten under a live model is a bus error).

    Args:
        model_class: a class with `from_pretrained` (diffusers or transformers).
        folder: the saved model.

    Returns:
        The loaded model, owning its tensors.
    """
    return copy.deepcopy(model_class.from_pretrained(folder))


def replace_folder(folder: Path, save: Callable[[Path], None]) -> Path:
    """Save into a staging folder next to `folder`, then replace `folder` with it.

    A failed save leaves the previous `folder` as it was.

    Args:
        folder: the folder to (re)write; it must exist.
        save: writes a complete folder at the path it is given.

    Returns:
        `folder`.
    """
    staging = folder.with_name(f"{folder.name}.staging")
    save(staging)
    shutil.rmtree(folder)
    staging.rename(folder)
    return folder
