"""GPU actor: invert every image of a batch once, then fan out all of its edits from that inversion
(with `inversion.prompt: target`, once per distinct target prompt, each serving the edits that use it).

Rows stay one per source sample. The actor adds:
    recon (B, S, S, 3) uint8, invert_seconds (B,), model_id, model_fingerprint,
    edits_json: per row a JSON list of the row's edits (edit_id, target_class, target_prompt, seed,
        sample_index, params, edit_seconds, ok, has_mask),
    edit_images: per row (E, S, S, 3) uint8, edit_masks: per row (E, S, S) bool (True = edited),
    failures_json: per row a JSON list of [edit_id | null, stage, error_type, message].
Rows whose inversion fails get status "invert_failed" and an invert error; when only some of a row's
target-prompt inversions fail, their edits become "invert" failures of the row.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np
import torch

from pipeline import engine
from pipeline.config import EditSpec, JobInversionConfig, MetricsConfig
from pipeline.engine import EditRequest
from pipeline.models.loading import load_diffusion_model
from pipeline.stages.plan import PlannedEdit, plan_edits

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str) -> str:
    """auto -> cuda when this process sees a GPU, else cpu."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def backbone_names(metrics: MetricsConfig) -> dict[str, str]:
    """The metric backbones recorded with every edit and in the manifest."""
    clip = metrics.clip
    names = {
        "clip": f"{clip.model_name}/{clip.pretrained or 'random-init'}",
        "perceptual": metrics.perceptual,
    }
    if metrics.classifier is not None:
        names["classifier"] = metrics.classifier
    return names


@dataclass(frozen=True)
class InversionUnit:
    """One inversion the actor runs: `row` of the batch inverted with `prompt`, serving `plans`.

    Attributes:
        row: index of the source sample in the batch.
        prompt: the prompt the image is inverted with.
        plans: the edits sampled from this inversion.
        plan_failures: (error_type, message) of edits that could not be planned for the row.
    """

    row: int
    prompt: str
    plans: list[PlannedEdit]
    plan_failures: list[tuple[str, str]]


class InvertEditActor:
    """Ray Data callable class; the model is loaded once per actor.

    Args:
        model_path: diffusers folder or hub id.
        device: auto | cpu | cuda.
        dtype: float32 | float16 | bfloat16.
        inversion: the job's inversion config (engine config + which prompt to invert with).
        edits: the job's edit plan.
        metrics: metrics config (only the backbone names are recorded here).
        edit_batch_size: edit requests sent to the engine per call.
    """

    def __init__(
        self,
        model_path: str,
        device: str,
        dtype: str,
        inversion: JobInversionConfig,
        edits: tuple[EditSpec, ...],
        metrics: MetricsConfig,
        edit_batch_size: int,
    ):
        self.model = load_diffusion_model(model_path, resolve_device(device), _DTYPES[dtype])
        self.inversion = inversion
        self.edits = edits
        self.backbones = backbone_names(metrics)
        self.edit_batch_size = edit_batch_size

    def _invert(self, images: torch.Tensor, prompts: list[str]) -> tuple[list, list[str | None], float]:
        """Invert a batch; when the engine rejects the whole batch, invert images one by one so
        only the offending image fails. Returns (per-image inversion handles, errors, seconds per image)."""
        try:
            result = engine.invert(self.model, images, prompts, self.inversion)
            per_image = result.seconds / len(prompts)
            return [(result, i) for i in range(len(prompts))], list(result.errors), per_image
        except Exception:  # isolate the failing image below
            if len(prompts) == 1:
                raise
        handles, errors, seconds = [], [], []
        for index, prompt in enumerate(prompts):
            try:
                result = engine.invert(self.model, images[index : index + 1], [prompt], self.inversion)
                handles.append((result, 0))
                errors.append(result.errors[0])
                seconds.append(result.seconds)
            except Exception as error:
                handles.append(None)
                errors.append(f"{type(error).__name__}: {error}")
        return handles, errors, float(np.mean(seconds)) if seconds else float("nan")

    def _edit(self, result, requests: list[EditRequest]) -> list:
        """Edit in chunks; a chunk the engine rejects is retried request by request."""
        outcomes = []
        for start in range(0, len(requests), self.edit_batch_size):
            chunk = requests[start : start + self.edit_batch_size]
            try:
                outcomes.extend(engine.edit(self.model, result, chunk))
                continue
            except Exception as error:
                if len(chunk) == 1:
                    outcomes.append(f"{type(error).__name__}: {error}")
                    continue
            for request in chunk:
                try:
                    outcomes.extend(engine.edit(self.model, result, [request]))
                except Exception as error:
                    outcomes.append(f"{type(error).__name__}: {error}")
        return outcomes

    def _inversion_units(self, batch: dict[str, np.ndarray], rows: list[int]) -> list[InversionUnit]:
        """What to invert for each row: its caption with all its edits (inversion.prompt = source), or
        each distinct target prompt with the edits that use it (= target; a row without edits is still
        inverted with its caption, for its reconstruction)."""
        units = []
        for row in rows:
            caption = str(batch["caption"][row])
            planned, failures = plan_edits(
                str(batch["source_id"][row]),
                batch["source_class"][row],
                caption,
                json.loads(batch["meta"][row]),
                self.edits,
                self.inversion,
                self.backbones,
            )
            if self.inversion.resolved_prompt == "source" or not planned:
                units.append(InversionUnit(row, caption, planned, failures))
                continue
            prompts = list(dict.fromkeys(plan.target_prompt for plan in planned))
            for index, prompt in enumerate(prompts):
                plans = [plan for plan in planned if plan.target_prompt == prompt]
                # The row's plan failures travel with its first unit only.
                units.append(InversionUnit(row, prompt, plans, failures if index == 0 else []))
        return units

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        size = self.model.image_size
        count = len(batch["status"])
        batch = dict(batch)
        status = batch["status"].astype(object).copy()
        error_stage, error_type, error = (
            batch[k].astype(object).copy() for k in ("error_stage", "error_type", "error")
        )
        recon = np.zeros((count, size, size, 3), dtype=np.uint8)
        invert_seconds = np.full(count, np.nan, dtype=np.float32)
        edits_json = np.array(["[]"] * count, dtype=object)
        failures_json = np.array(["[]"] * count, dtype=object)
        edit_images = [np.zeros((0, size, size, 3), dtype=np.uint8) for _ in range(count)]
        edit_masks = [np.zeros((0, size, size), dtype=bool) for _ in range(count)]

        ok_rows = [i for i in range(count) if status[i] == "ok"]
        if batch["image"].shape[1:3] != (size, size):
            raise ValueError(
                f"preprocessed images are {batch['image'].shape[1:3]} but model {self.model.model_id} takes {size}x{size}; "
                "fix model.image_size in the job spec (or leave it null to read it from the model)"
            )
        if ok_rows:
            units = self._inversion_units(batch, ok_rows)
            images = torch.from_numpy(np.ascontiguousarray(batch["image"][[unit.row for unit in units]]))
            handles, errors, per_image = self._invert(images, [unit.prompt for unit in units])
            # Group requests by inversion result so each image's edits share its inversion.
            by_result: dict[int, tuple] = {}
            for row in ok_rows:
                row_units = [(u, handles[i], errors[i]) for i, u in enumerate(units) if u.row == row]
                inverted = [(u, h) for u, h, e in row_units if e is None and h is not None]
                if not inverted:
                    status[row], error_stage[row] = "invert_failed", "invert"
                    error_type[row], error[row] = "InversionError", str(row_units[0][2])
                    continue
                first_result, first_index = inverted[0][1]
                invert_seconds[row] = per_image * len(inverted)
                recon[row] = first_result.reconstructions[first_index].cpu().numpy()
                failures = [[None, "plan", kind, message] for kind, message in row_units[0][0].plan_failures]
                for unit, handle, unit_error in row_units:
                    if handle is None or unit_error is not None:
                        failures += [
                            [plan.edit_id, "invert", "InversionError", str(unit_error)] for plan in unit.plans
                        ]
                        continue
                    result, image_index = handle
                    entry = by_result.setdefault(id(result), (result, []))
                    entry[1].extend((row, image_index, plan) for plan in unit.plans)
                failures_json[row] = json.dumps(failures)
            for result, jobs in by_result.values():
                self._run_edits(result, jobs, edits_json, failures_json, edit_images, edit_masks, size)

        batch.update(
            status=status,
            error_stage=error_stage,
            error_type=error_type,
            error=error,
            recon=recon,
            invert_seconds=invert_seconds,
            edits_json=edits_json,
            failures_json=failures_json,
            edit_images=_object_column(edit_images),
            edit_masks=_object_column(edit_masks),
            model_id=np.array([self.model.model_id] * count, dtype=object),
            model_fingerprint=np.array([self.model.fingerprint] * count, dtype=object),
        )
        batch["stage_seconds"] = batch["stage_seconds"] + (time.perf_counter() - started) / count
        return batch

    def _run_edits(
        self,
        result,
        jobs: list[tuple[int, int, PlannedEdit]],
        edits_json,
        failures_json,
        edit_images,
        edit_masks,
        size,
    ) -> None:
        requests = [
            EditRequest(
                image_index, plan.target_prompt, plan.control, plan.eta, plan.latent_interpolation, plan.seed
            )
            for _, image_index, plan in jobs
        ]
        outcomes = self._edit(result, requests)
        per_row: dict[int, tuple[list, list, list]] = {}
        for (row, _, plan), outcome in zip(jobs, outcomes, strict=True):
            records, images, masks = per_row.setdefault(row, ([], [], []))
            failed = outcome if isinstance(outcome, str) else outcome.error
            if failed is not None or outcome.image is None:
                failures = json.loads(failures_json[row])
                failures.append(
                    [plan.edit_id, "edit", "EditError", str(failed or "engine returned no image")]
                )
                failures_json[row] = json.dumps(failures)
                continue
            has_mask = outcome.mask is not None
            images.append(outcome.image.cpu().numpy().astype(np.uint8))
            masks.append(
                outcome.mask.cpu().numpy().astype(bool) if has_mask else np.ones((size, size), dtype=bool)
            )
            records.append(
                {
                    "edit_id": plan.edit_id,
                    "target_class": plan.target_class,
                    "target_prompt": plan.target_prompt,
                    "seed": plan.seed,
                    "sample_index": plan.sample_index,
                    "params": plan.params,
                    "edit_seconds": float(outcome.seconds),
                    "has_mask": has_mask,
                }
            )
        for row, (records, images, masks) in per_row.items():
            edits_json[row] = json.dumps(records)
            if images:
                edit_images[row] = np.stack(images)
                edit_masks[row] = np.stack(masks)


def _object_column(arrays: list[np.ndarray]) -> np.ndarray:
    """A 1-D object array holding one ndarray per row (shapes may differ)."""
    column = np.empty(len(arrays), dtype=object)
    for index, array in enumerate(arrays):
        column[index] = array
    return column
