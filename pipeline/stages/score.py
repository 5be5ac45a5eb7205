"""Metrics actor: CLIP-T, CLIP-I, directional CLIP, LPIPS and background PSNR/LPIPS of every edit,
PSNR/SSIM/LPIPS of every reconstruction. Backbones come from the job's metrics config and are
recorded in every edit's params and in the manifest.

Adds per row: recon_psnr, recon_ssim, recon_lpips (float32, NaN when not computed) and the metric
values inside each entry of edits_json (clip_t, clip_i, clip_dir, lpips, bg_psnr, bg_lpips; null
when undefined, e.g. bg_* when the edit mask covers the whole image; bg_psnr is +inf when the
background is unchanged to the last bit), diversity and diversity_bound (eq. 5 of Park et al.: the
mean pairwise perceptual distance among the stochastic samples of the edit's sample_group, and their
mean distance to the source; null for deterministic edits), and classified_as: the class that metrics.classifier
reads in the edited image (null when no classifier is configured). When a batch cannot be scored,
its ok rows become "score_failed" with a score failure (`pipeline.stages.rows.mark_failed`).
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch

from pipeline.config import MetricsConfig
from pipeline.factories import load_factory
from pipeline.models.device import resolve_device
from pipeline.stages.rows import (
    CAPTION,
    EDIT_IMAGES,
    EDIT_MASKS,
    EDITS_JSON,
    FAILURES,
    IMAGE,
    OK,
    RECON,
    RECON_LPIPS,
    RECON_PSNR,
    RECON_SSIM,
    STAGE_SECONDS,
    STATUS,
    BatchRow,
    Failure,
    mark_failed,
)


def to_unit_float(images: np.ndarray, device: str) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float() / 255.0


def _values(tensor: torch.Tensor) -> list[float | None]:
    """Floats, with None for NaN (undefined, e.g. an empty region); +inf (identical pixels) is kept."""
    return [None if np.isnan(value) else float(value) for value in tensor.detach().double().cpu().numpy()]


class ScoreActor:
    """Ray Data callable class; CLIP and LPIPS models are loaded once per actor.

    Args:
        metrics: the job's metrics config.
    """

    def __init__(self, metrics: MetricsConfig):
        from pipeline.metrics import ClipScorer, build_perceptual

        self.device = resolve_device(metrics.device)
        self.clip = ClipScorer(
            metrics.clip.model_name,
            metrics.clip.pretrained,
            self.device,
            model_config=metrics.clip.config_file,
        )
        extractor = load_factory(metrics.feature_extractor)() if metrics.feature_extractor else None
        self.perceptual = build_perceptual(
            metrics.perceptual, device=self.device, feature_extractor=extractor
        )
        self.classifier = (
            load_factory(metrics.classifier, "metrics.classifier")() if metrics.classifier else None
        )
        if isinstance(self.classifier, torch.nn.Module):
            self.classifier = self.classifier.to(self.device).eval()

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from pipeline.metrics import psnr, ssim

        started = time.perf_counter()
        batch = dict(batch)
        count = len(batch[STATUS])
        batch[STATUS] = batch[STATUS].astype(object).copy()
        batch[FAILURES] = batch[FAILURES].astype(object).copy()
        recon_metrics = {
            name: np.full(count, np.nan, dtype=np.float32) for name in (RECON_PSNR, RECON_SSIM, RECON_LPIPS)
        }
        edits_json = batch[EDITS_JSON].astype(object).copy()

        rows = [i for i in range(count) if batch[STATUS][i] == OK]
        if rows:
            try:
                source = to_unit_float(batch[IMAGE][rows], self.device)
                recon = to_unit_float(batch[RECON][rows], self.device)
                recon_metrics[RECON_PSNR][rows] = psnr(recon, source).float().cpu().numpy()
                recon_metrics[RECON_SSIM][rows] = ssim(recon, source).float().cpu().numpy()
                recon_metrics[RECON_LPIPS][rows] = self.perceptual(recon, source).float().cpu().numpy()
                self._score_edits(batch, rows, edits_json)
            except Exception as error:  # one bad batch must not fail the job: its rows fail scoring
                for row in rows:
                    mark_failed(BatchRow(batch, row), Failure.from_error("score", error))
        batch.update(recon_metrics)
        batch[EDITS_JSON] = edits_json
        batch[STAGE_SECONDS] = batch[STAGE_SECONDS] + (time.perf_counter() - started) / count
        return batch

    def _score_edits(self, batch: dict, rows: list[int], edits_json: np.ndarray) -> None:
        """Score all edits of `rows` in one batched pass per metric."""
        from pipeline.metrics import psnr

        owners, records, sources, edited, masks, source_texts = [], [], [], [], [], []
        for row in rows:
            for index, record in enumerate(json.loads(edits_json[row])):
                owners.append(row)
                records.append(record)
                sources.append(batch[IMAGE][row])
                edited.append(batch[EDIT_IMAGES][row][index])
                masks.append(batch[EDIT_MASKS][row][index])
                source_texts.append(str(batch[CAPTION][row]))
        if not records:
            return
        target_texts = [record["target_prompt"] for record in records]
        source = to_unit_float(np.stack(sources), self.device)
        edit = to_unit_float(np.stack(edited), self.device)
        background = ~torch.from_numpy(np.stack(masks)).to(self.device)
        has_background = background.flatten(1).any(dim=1).cpu().numpy()
        scores = {
            "clip_t": _values(self.clip.clip_t(edit, target_texts)),
            "clip_i": _values(self.clip.clip_i(edit, source)),
            "clip_dir": _values(self.clip.clip_dir(source, edit, source_texts, target_texts)),
            "lpips": _values(self.perceptual(edit, source)),
            "bg_psnr": _values(psnr(edit, source, mask=background)),
            "bg_lpips": _values(self.perceptual(edit, source, mask=background)),
            "classified_as": self._classify(edit),
        }
        diversity = self._diversity(owners, records, edit, scores["lpips"])
        scores["diversity"] = [value for value, _ in diversity]
        scores["diversity_bound"] = [bound for _, bound in diversity]
        by_row: dict[int, list[dict]] = {}
        for position, (row, record) in enumerate(zip(owners, records, strict=True)):
            for name, values in scores.items():
                background_metric = name.startswith("bg_")
                usable = record["has_mask"] and has_background[position] if background_metric else True
                record[name] = values[position] if usable else None
            by_row.setdefault(row, []).append(record)
        for row, row_records in by_row.items():
            edits_json[row] = json.dumps(row_records)

    def _diversity(
        self, owners: list[int], records: list[dict], edit: torch.Tensor, lpips: list[float | None]
    ) -> list[tuple[float | None, float | None]]:
        """Per edit: (diversity, bound) of its sample group (eq. 5); None for deterministic edits and
        groups of one sample."""
        from pipeline.metrics.diversity import mean_pairwise_distance

        groups: dict[tuple[int, str], list[int]] = {}
        for position, (row, record) in enumerate(zip(owners, records, strict=True)):
            if record.get("sample_group") is not None:
                groups.setdefault((row, record["sample_group"]), []).append(position)
        values: list[tuple[float | None, float | None]] = [(None, None)] * len(records)
        for positions in groups.values():
            if len(positions) < 2:
                continue
            index = torch.tensor(positions, device=edit.device)
            diversity = mean_pairwise_distance(edit[index], self.perceptual)
            distances = [lpips[p] for p in positions]
            bound = None if None in distances else sum(distances) / len(distances)
            for position in positions:
                values[position] = (None if diversity != diversity else diversity, bound)
        return values

    def _classify(self, images: torch.Tensor) -> list[str | None]:
        """The class metrics.classifier reads in each of images (B, 3, H, W) in [0, 1]; None without one."""
        if self.classifier is None:
            return [None] * len(images)
        names = list(self.classifier(images))
        if len(names) != len(images) or not all(isinstance(name, str) for name in names):
            raise TypeError(
                f"metrics.classifier returned {names!r} for {len(images)} images; it must return one class "
                "name (str) per image"
            )
        return names
