"""GPU actor: invert every image of a batch once, then fan out all of its edits from that inversion
(with `inversion.prompt: target`, once per distinct target prompt, each serving the edits that use it).
Edits that name trained editors (`EditSpec.editors`) start from the source image instead: the actor
loads every editor once (refusing one trained on another base model) and runs all rows of one
combination of editors and weights in one batched call (`pipeline.editors.edit_with_editors`).

Rows stay one per source sample. The actor adds (names in `pipeline.stages.rows`):
    recon (B, S, S, 3) uint8, invert_seconds (B,), model_id, model_fingerprint,
    edits_json: per row a JSON list of the row's edits (edit_id, target_class, target_prompt, seed,
        sample_index, sample_seed, sample_group, params, edit_seconds, has_mask),
    edit_images: per row (E, S, S, 3) uint8, edit_masks: per row (E, S, S) bool (True = edited),
    gpu_peak_bytes (B,): torch.cuda.max_memory_allocated of the actor so far (NaN on a CPU),
    inversion_states: per row a list of the row's stored inversions (safetensors bytes, one per
        successful inversion, `pipeline.inversion_state`); empty unless inversion.keep_artifacts,
and records failures in the row's failures (`mark_failed`): a row whose inversion fails gets status
"invert_failed" and an invert failure; when only some of a row's target-prompt inversions fail, their
edits get "invert" failures; edits that cannot be planned get "plan" failures, edits the engine
rejects "edit" failures.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline import engine
from pipeline.config import EditSpec, JobInversionConfig, MetricsConfig
from pipeline.editors import (
    ZipEncoder,
    edit_with_editors,
    load_editors,
    load_embedding_vae,
    load_null_text_vae,
    read_reference_image,
)
from pipeline.engine import EditRequest
from pipeline.inversion_state import inversion_to_bytes
from pipeline.metrics.backbones import backbone_names
from pipeline.models.device import resolve_device
from pipeline.models.loading import load_diffusion_model
from pipeline.stages.plan import PlannedEdit, plan_edits
from pipeline.stages.rows import (
    CAPTION,
    EDIT_IMAGES,
    EDIT_MASKS,
    EDITS_JSON,
    FAILURES,
    GPU_PEAK_BYTES,
    IMAGE,
    INVERSION_STATES,
    INVERT_SECONDS,
    META,
    MODEL_FINGERPRINT,
    MODEL_ID,
    OK,
    RECON,
    SOURCE_CLASS,
    SOURCE_ID,
    STAGE_SECONDS,
    STATUS,
    BatchRow,
    Failure,
    mark_failed,
)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class InversionUnit:
    """One inversion the actor runs: `row` of the batch inverted with `prompt`, serving `plans`.

    Attributes:
        row: index of the source sample in the batch.
        prompt: the prompt the image is inverted with.
        plans: the edits sampled from this inversion.
        plan_failures: "plan" failures of edits that could not be planned for the row.
        editor_plans: the row's edits made by trained editors (from the source image, not the
            inversion); like plan_failures they travel with the row's first unit only.
    """

    row: int
    prompt: str
    plans: list[PlannedEdit]
    plan_failures: list[Failure]
    editor_plans: list[PlannedEdit] = field(default_factory=list)


@dataclass(frozen=True)
class InvertedImage:
    """Where one unit's inversion is held: image `index` of the `call`-th engine result of the batch.

    Attributes:
        call: position of the engine result in the list `InvertEditActor._invert` returns.
        index: the image's index in that result.
    """

    call: int
    index: int


@dataclass(frozen=True)
class EditJob:
    """One planned edit of `row`, sampled from image `image_index` of an engine result."""

    row: int
    image_index: int
    plan: PlannedEdit


@dataclass(frozen=True)
class EditorOutcome:
    """One edit made by trained editors, shaped like the engine's edit result for `RowOutput.add_edit`.

    Attributes:
        image: (S, S, 3) uint8.
        seconds: this edit's share of its batch's wall time.
        mask: always None: the editors change the image without a region.
    """

    image: torch.Tensor
    seconds: float
    mask: None = None


@dataclass
class RowOutput:
    """What the actor accumulates for one row of the batch over its inversions and edit calls.

    Attributes:
        row: the row in the batch; its status and failures are recorded there with `mark_failed`.
        size: the model's image side.
        recon: the reconstruction of the row's first successful inversion, or None.
        invert_seconds: inversion time spent on the row (NaN when not inverted).
        records: one edits_json entry per successful edit, in edit order.
        images: the edited images (S, S, 3) uint8, in the order of records.
        masks: the edit masks (S, S) bool (all True when the engine gives none), same order.
        states: the row's stored inversions (inversion.keep_artifacts), in inversion order.
    """

    row: BatchRow
    size: int
    recon: np.ndarray | None = None
    invert_seconds: float = float("nan")
    records: list[dict] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)
    states: list[bytes] = field(default_factory=list)

    def fail(self, failure: Failure, *, fails_row: bool = False) -> None:
        """Record a failure of one of the row's edits, or with fails_row of the row itself."""
        mark_failed(self.row, failure, fails_row=fails_row)

    def add_edit(self, plan: PlannedEdit, outcome: Any) -> None:
        """Keep one successful engine edit of `plan`."""
        has_mask = outcome.mask is not None
        self.images.append(outcome.image.cpu().numpy().astype(np.uint8))
        self.masks.append(
            outcome.mask.cpu().numpy().astype(bool)
            if has_mask
            else np.ones((self.size, self.size), dtype=bool)
        )
        self.records.append(
            {
                "edit_id": plan.edit_id,
                "target_class": plan.target_class,
                "target_prompt": plan.target_prompt,
                "seed": plan.seed,
                "sample_index": plan.sample_index,
                "sample_seed": plan.sample_seed,
                "sample_group": plan.sample_group,
                "params": plan.params,
                "edit_seconds": float(outcome.seconds),
                "has_mask": has_mask,
            }
        )

    def edit_images(self) -> np.ndarray:
        """(E, S, S, 3) uint8."""
        return (
            np.stack(self.images) if self.images else np.zeros((0, self.size, self.size, 3), dtype=np.uint8)
        )

    def edit_masks(self) -> np.ndarray:
        """(E, S, S) bool."""
        return np.stack(self.masks) if self.masks else np.zeros((0, self.size, self.size), dtype=bool)


def _inversion_failure(message: str) -> Failure:
    return Failure("invert", "InversionError", message)


def _edit_failure(message: str, edit_id: str) -> Failure:
    return Failure("edit", "EditError", message, edit_id)


def _image_encoder(inversion: JobInversionConfig, metrics: MetricsConfig, device: torch.device):
    """The frozen vision tower of the job's CLIP model (metrics.clip) when the method encodes the
    image itself (style_diffusion's E(x)); None otherwise."""
    if not inversion.info.needs_image_encoder:
        return None
    from pipeline.metrics.clip import ClipScorer

    clip = metrics.clip
    return ClipScorer(clip.model_name, clip.pretrained, device, model_config=clip.config_file).image_tokens


class InvertEditActor:
    """Ray Data callable class; the model is loaded once per actor.

    Args:
        model_path: diffusers folder or hub id.
        device: auto | cpu | cuda.
        dtype: float32 | float16 | bfloat16.
        precision: fp32 | tf32 | mixed | bf16, the UNet's numeric policy.
        inversion: the job's inversion config (engine config + which prompt to invert with).
        edits: the job's edit plan.
        metrics: metrics config (the backbone names are recorded here; a method that encodes the image
            itself, such as style_diffusion, uses its CLIP model's vision tower).
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
        precision: str = "fp32",
    ):
        self.model = load_diffusion_model(model_path, resolve_device(device), _DTYPES[dtype], precision)
        self.inversion = inversion
        self.edits = edits
        self.backbones = backbone_names(metrics)
        self.edit_batch_size = edit_batch_size
        self.image_encoder = _image_encoder(inversion, metrics, self.model.device)
        # Refuses an editor trained on another base model before any row is read.
        self.editors = load_editors(self.model, [ref.uri for spec in edits for ref in spec.editors])
        self.embedding_vaes = {
            uri: load_embedding_vae(self.model, uri)
            for uri in dict.fromkeys(spec.vae for spec in edits if spec.vae)
        }
        # null_text_vae's amortised option: one VAE for every image, read once per actor.
        inversion_vae = getattr(inversion.method_params, "vae", None)
        self.inversion_vae = load_null_text_vae(self.model, inversion_vae) if inversion_vae else None
        self._references: dict[str, torch.Tensor] = {}

    def _invert(
        self, images: torch.Tensor, prompts: list[str]
    ) -> tuple[list, list[InvertedImage | Failure], float]:
        """Invert a batch; when the engine rejects the whole batch, invert images one by one so only
        the offending image fails.

        Returns:
            (engine results, per image where its inversion is held or its failure, seconds per image).
        """
        try:
            result = engine.invert(
                self.model, images, prompts, self.inversion, self.image_encoder, self.inversion_vae
            )
        except Exception:  # retried image by image, where each image's failure is labelled
            if len(prompts) == 1:
                raise
            return self._invert_one_by_one(images, prompts)
        inverted = [
            InvertedImage(0, index) if error is None else _inversion_failure(str(error))
            for index, error in enumerate(result.errors)
        ]
        return [result], inverted, result.seconds / len(prompts)

    def _invert_one_by_one(
        self, images: torch.Tensor, prompts: list[str]
    ) -> tuple[list, list[InvertedImage | Failure], float]:
        """`_invert` with one engine call per image; an image the engine raises on gets its failure."""
        results, inverted, seconds = [], [], []
        for index, prompt in enumerate(prompts):
            try:
                result = engine.invert(
                    self.model,
                    images[index : index + 1],
                    [prompt],
                    self.inversion,
                    self.image_encoder,
                    self.inversion_vae,
                )
            except Exception as error:  # this image's inversion failure
                inverted.append(_inversion_failure(f"{type(error).__name__}: {error}"))
                continue
            results.append(result)
            seconds.append(result.seconds)
            error = result.errors[0]
            inverted.append(
                InvertedImage(len(results) - 1, 0) if error is None else _inversion_failure(str(error))
            )
        return results, inverted, float(np.mean(seconds)) if seconds else float("nan")

    def _edit(self, result, requests: list[EditRequest], edit_ids: list[str]) -> list:
        """Edit in chunks; a chunk the engine rejects is retried request by request.

        Returns:
            Per request, the engine's edit outcome or the "edit" failure of a request it raised on.
        """
        outcomes = []
        for start in range(0, len(requests), self.edit_batch_size):
            chunk = requests[start : start + self.edit_batch_size]
            chunk_ids = edit_ids[start : start + self.edit_batch_size]
            try:
                outcomes.extend(engine.edit(self.model, result, chunk))
            except Exception as error:
                if len(chunk) == 1:
                    outcomes.append(_edit_failure(f"{type(error).__name__}: {error}", chunk_ids[0]))
                else:
                    outcomes.extend(self._edit_one_by_one(result, chunk, chunk_ids))
        return outcomes

    def _edit_one_by_one(self, result, requests: list[EditRequest], edit_ids: list[str]) -> list:
        """`_edit` with one engine call per request."""
        outcomes = []
        for request, edit_id in zip(requests, edit_ids, strict=True):
            try:
                outcomes.extend(engine.edit(self.model, result, [request]))
            except Exception as error:  # this edit's failure
                outcomes.append(_edit_failure(f"{type(error).__name__}: {error}", edit_id))
        return outcomes

    def _inversion_units(self, batch: dict[str, np.ndarray], rows: list[int]) -> list[InversionUnit]:
        """What to invert for each row: its caption with all its edits (inversion.prompt = source), or
        each distinct target prompt with the edits that use it (= target; a row without edits is still
        inverted with its caption, for its reconstruction)."""
        units = []
        for row in rows:
            caption = str(batch[CAPTION][row])
            planned, failures = plan_edits(
                str(batch[SOURCE_ID][row]),
                batch[SOURCE_CLASS][row],
                caption,
                json.loads(batch[META][row]),
                self.edits,
                self.inversion,
                self.backbones,
            )
            by_editors = [plan for plan in planned if plan.editors]
            planned = [plan for plan in planned if not plan.editors]
            if self.inversion.resolved_prompt == "source" or not planned:
                units.append(InversionUnit(row, caption, planned, failures, by_editors))
                continue
            prompts = list(dict.fromkeys(plan.target_prompt for plan in planned))
            for index, prompt in enumerate(prompts):
                plans = [plan for plan in planned if plan.target_prompt == prompt]
                # The row's plan failures and editor edits travel with its first unit only.
                first = index == 0
                units.append(
                    InversionUnit(row, prompt, plans, failures if first else [], by_editors if first else [])
                )
        return units

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        size = self.model.image_size
        count = len(batch[STATUS])
        batch = dict(batch)
        batch[STATUS] = batch[STATUS].astype(object).copy()
        batch[FAILURES] = batch[FAILURES].astype(object).copy()
        outputs = [RowOutput(BatchRow(batch, row), size) for row in range(count)]

        ok_rows = [row for row in range(count) if batch[STATUS][row] == OK]
        if batch[IMAGE].shape[1:3] != (size, size):
            raise ValueError(
                f"preprocessed images are {batch[IMAGE].shape[1:3]} but model {self.model.model_id} takes {size}x{size}; "
                "fix model.image_size in the job spec (or leave it null to read it from the model)"
            )
        if ok_rows:
            units = self._inversion_units(batch, ok_rows)
            images = torch.from_numpy(np.ascontiguousarray(batch[IMAGE][[unit.row for unit in units]]))
            results, inverted, per_image = self._invert(images, [unit.prompt for unit in units])
            # The edits of each engine result, so each image's edits share its inversion.
            jobs: dict[int, list[EditJob]] = {}
            for row in ok_rows:
                row_units = [(unit, inverted[i]) for i, unit in enumerate(units) if unit.row == row]
                self._collect_row(outputs[row], row_units, results, per_image, jobs)
                if self.inversion.keep_artifacts:
                    outputs[row].states = self._states(row_units, results)
            for call, call_jobs in jobs.items():
                self._run_edits(results[call], call_jobs, outputs)
            # Editor edits start from the source image; they run for the rows whose inversion succeeded.
            editor_jobs = [
                EditJob(unit.row, unit.row, plan)
                for unit in units
                for plan in unit.editor_plans
                if outputs[unit.row].recon is not None
            ]
            self._run_editor_edits(batch[IMAGE], editor_jobs, outputs)

        recon = np.zeros((count, size, size, 3), dtype=np.uint8)
        for row, output in enumerate(outputs):
            if output.recon is not None:
                recon[row] = output.recon
        batch.update(
            {
                RECON: recon,
                INVERT_SECONDS: np.array([output.invert_seconds for output in outputs], dtype=np.float32),
                EDITS_JSON: np.array([json.dumps(output.records) for output in outputs], dtype=object),
                EDIT_IMAGES: _object_column([output.edit_images() for output in outputs]),
                EDIT_MASKS: _object_column([output.edit_masks() for output in outputs]),
                MODEL_ID: np.array([self.model.model_id] * count, dtype=object),
                MODEL_FINGERPRINT: np.array([self.model.fingerprint] * count, dtype=object),
                GPU_PEAK_BYTES: np.full(count, _gpu_peak_bytes(self.model.device), dtype=np.float64),
                INVERSION_STATES: _object_column([output.states for output in outputs]),
            }
        )
        batch[STAGE_SECONDS] = batch[STAGE_SECONDS] + (time.perf_counter() - started) / count
        return batch

    def _states(
        self, row_units: list[tuple[InversionUnit, InvertedImage | Failure]], results: list
    ) -> list[bytes]:
        """The row's successful inversions as stored inversions, in unit order."""
        return [
            inversion_to_bytes(results[image.call], image.index, self.model.fingerprint)
            for _, image in row_units
            if isinstance(image, InvertedImage)
        ]

    @staticmethod
    def _collect_row(
        output: RowOutput,
        row_units: list[tuple[InversionUnit, InvertedImage | Failure]],
        results: list,
        per_image: float,
        jobs: dict[int, list[EditJob]],
    ) -> None:
        """Record one row's inversions: its failure when none succeeded, else its reconstruction,
        inversion time, plan and invert failures, and its edits (added to `jobs` by engine result)."""
        inverted = [image for _, image in row_units if isinstance(image, InvertedImage)]
        if not inverted:
            output.fail(row_units[0][1], fails_row=True)
            return
        first = inverted[0]
        output.invert_seconds = per_image * len(inverted)
        output.recon = results[first.call].reconstructions[first.index].cpu().numpy()
        for failure in row_units[0][0].plan_failures:
            output.fail(failure)
        for unit, image in row_units:
            if isinstance(image, Failure):
                for plan in unit.plans:
                    output.fail(dataclasses.replace(image, edit_id=plan.edit_id))
                continue
            jobs.setdefault(image.call, []).extend(
                EditJob(output.row.index, image.index, plan) for plan in unit.plans
            )

    def _run_edits(self, result, jobs: list[EditJob], outputs: list[RowOutput]) -> None:
        """Run the edits of one engine result and add each outcome to its row's output."""
        requests = [
            EditRequest(
                job.image_index,
                job.plan.target_prompt,
                job.plan.control,
                job.plan.eta,
                job.plan.latent_interpolation,
                job.plan.seed if job.plan.sample_seed is None else job.plan.sample_seed,
                job.plan.sample_temperature,
                self.embedding_vaes.get(job.plan.embedding_vae),
            )
            for job in jobs
        ]
        outcomes = self._edit(result, requests, [job.plan.edit_id for job in jobs])
        for job, outcome in zip(jobs, outcomes, strict=True):
            output = outputs[job.row]
            if isinstance(outcome, Failure):
                output.fail(outcome)
            elif outcome.error is not None or outcome.image is None:
                output.fail(_edit_failure(str(outcome.error or "engine returned no image"), job.plan.edit_id))
            else:
                output.add_edit(self._with_vae_version(job.plan), outcome)

    def _with_vae_version(self, plan):
        """The plan with the version of the trained VAE its sample came from in params (what produced the
        edit): its conditional-embedding VAE, or the inversion's dataset-wide null-text VAE."""
        if plan.embedding_vae is not None:
            vae = self.embedding_vaes[plan.embedding_vae]
        elif plan.sample_seed is not None and self.inversion_vae is not None:
            vae = self.inversion_vae
        else:
            return plan
        params = json.loads(plan.params)
        params["stochastic"]["version"] = vae.version
        return dataclasses.replace(plan, params=json.dumps(params, sort_keys=True))

    def _reference(self, uri: str) -> torch.Tensor:
        """A ZIP reference image, read once per actor."""
        if uri not in self._references:
            self._references[uri] = read_reference_image(uri, self.model.image_size)
        return self._references[uri]

    def _run_editor_edits(self, images: np.ndarray, jobs: list[EditJob], outputs: list[RowOutput]) -> None:
        """Run the editor edits (EditJob.image_index = the row of `images`), one engine batch per
        combination of editors and weights, in chunks of edit_batch_size; a chunk that raises is retried
        edit by edit so only the failing edit gets its "edit" failure."""
        groups: dict[tuple, list[EditJob]] = {}
        for job in jobs:
            groups.setdefault((job.plan.editors, job.plan.editor_combination), []).append(job)
        for (refs, mode), group in groups.items():
            combination = EditorCombination(
                editors=[self.editors[ref.uri] for ref in refs],
                gammas=[ref.gamma for ref in refs],
                windows=[ref.window for ref in refs],
                reference=next((ref.reference for ref in refs if ref.reference is not None), None),
                mode=mode,
            )
            for start in range(0, len(group), self.edit_batch_size):
                chunk = group[start : start + self.edit_batch_size]
                try:
                    self._editor_chunk(images, chunk, combination, outputs)
                except Exception:  # retried edit by edit, where each edit's failure is labelled
                    for job in chunk:
                        try:
                            self._editor_chunk(images, [job], combination, outputs)
                        except Exception as error:  # this edit's failure
                            message = f"{type(error).__name__}: {error}"
                            outputs[job.row].fail(_edit_failure(message, job.plan.edit_id))

    def _editor_chunk(
        self, images: np.ndarray, chunk: list[EditJob], combination: EditorCombination, outputs
    ) -> None:
        started = time.perf_counter()
        sources = torch.from_numpy(np.ascontiguousarray(images[[job.image_index for job in chunk]]))
        reference = combination.reference
        editors = combination.editors
        edited = edit_with_editors(
            self.model,
            sources,
            editors,
            combination.gammas,
            reference=None if reference is None else self._reference(reference),
            windows=combination.windows,
            combination=combination.mode,
        )
        seconds = (time.perf_counter() - started) / len(chunk)
        versions = {editor.uri: editor.version for editor in editors}
        zip_edit = any(isinstance(editor, ZipEncoder) for editor in editors)
        for job, image in zip(chunk, edited, strict=True):
            params = json.loads(job.plan.params)
            if zip_edit:
                params["method"] = "zip"
            for record in params["editors"]:
                record["version"] = versions[record["uri"]]
            plan = dataclasses.replace(job.plan, params=json.dumps(params, sort_keys=True))
            outputs[job.row].add_edit(plan, EditorOutcome(image, seconds))


@dataclass(frozen=True)
class EditorCombination:
    """The loaded editors of one edit, their weights, their timestep windows (None = every step), the
    ZIP reference URI (None = the encoder's own) and how the editors' noises combine."""

    editors: list
    gammas: list[float]
    windows: list[tuple[int, int] | None]
    reference: str | None
    mode: str = "convex"


def _gpu_peak_bytes(device: torch.device) -> float:
    """torch.cuda.max_memory_allocated of the actor's GPU so far; NaN on a CPU (no GPU memory to report)."""
    if device.type != "cuda":
        return float("nan")
    return float(torch.cuda.max_memory_allocated(device))


def _object_column(arrays: list[np.ndarray]) -> np.ndarray:
    """A 1-D object array holding one ndarray per row (shapes may differ)."""
    column = np.empty(len(arrays), dtype=object)
    for index, array in enumerate(arrays):
        column[index] = array
    return column
