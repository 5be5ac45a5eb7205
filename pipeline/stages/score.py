"""Metrics actor: CLIP-T, CLIP-I, directional CLIP, LPIPS and background PSNR/LPIPS of every edit,
PSNR/SSIM/LPIPS of every reconstruction. Backbones come from the job's metrics config and are
recorded in every edit's params and in the manifest.

Adds per row: recon_psnr, recon_ssim, recon_lpips (float32, NaN when not computed) and the metric
values inside each entry of edits_json (clip_t, clip_i, clip_dir, lpips, bg_psnr, bg_lpips; null
when undefined, e.g. bg_* when the edit mask covers the whole image; bg_psnr is +inf when the
background is unchanged to the last bit), and classified_as: the class that metrics.classifier
reads in the edited image (null when no classifier is configured).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.config import MetricsConfig
from pipeline.stages.invert_edit import resolve_device


def load_factory(reference: str, key: str = "metrics.feature_extractor"):
    """Import "package.module:name" or "/path/file.py:name" and return `name`; `key` names the setting."""
    location, _, name = reference.rpartition(":")
    if not location or not name:
        raise ValueError(f"{key} {reference!r}: expected 'package.module:factory' or '/path/file.py:factory'")
    if location.endswith(".py"):
        module_name = f"_inversa_factory_{Path(location).stem}"
        module = sys.modules.get(module_name)
        if module is None:
            spec = importlib.util.spec_from_file_location(module_name, location)
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module  # dataclasses and pickling look modules up here
            spec.loader.exec_module(module)
    else:
        module = importlib.import_module(location)
    return getattr(module, name)


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
        count = len(batch["status"])
        status = batch["status"].astype(object).copy()
        error_stage, error_type, error = (
            batch[k].astype(object).copy() for k in ("error_stage", "error_type", "error")
        )
        recon_metrics = {
            name: np.full(count, np.nan, dtype=np.float32)
            for name in ("recon_psnr", "recon_ssim", "recon_lpips")
        }
        edits_json = batch["edits_json"].astype(object).copy()

        rows = [i for i in range(count) if status[i] == "ok"]
        if rows:
            try:
                source = to_unit_float(batch["image"][rows], self.device)
                recon = to_unit_float(batch["recon"][rows], self.device)
                recon_metrics["recon_psnr"][rows] = psnr(recon, source).float().cpu().numpy()
                recon_metrics["recon_ssim"][rows] = ssim(recon, source).float().cpu().numpy()
                recon_metrics["recon_lpips"][rows] = self.perceptual(recon, source).float().cpu().numpy()
                self._score_edits(batch, rows, edits_json)
            except Exception as failure:  # one bad batch must not fail the job: mark its rows
                for row in rows:
                    status[row], error_stage[row] = "score_failed", "score"
                    error_type[row], error[row] = type(failure).__name__, str(failure)
        batch.update(
            status=status,
            error_stage=error_stage,
            error_type=error_type,
            error=error,
            edits_json=edits_json,
            **recon_metrics,
        )
        batch["stage_seconds"] = batch["stage_seconds"] + (time.perf_counter() - started) / count
        return batch

    def _score_edits(self, batch: dict, rows: list[int], edits_json: np.ndarray) -> None:
        """Score all edits of `rows` in one batched pass per metric."""
        from pipeline.metrics import psnr

        owners, records, sources, edited, masks, source_texts = [], [], [], [], [], []
        for row in rows:
            for index, record in enumerate(json.loads(edits_json[row])):
                owners.append(row)
                records.append(record)
                sources.append(batch["image"][row])
                edited.append(batch["edit_images"][row][index])
                masks.append(batch["edit_masks"][row][index])
                source_texts.append(str(batch["caption"][row]))
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
        by_row: dict[int, list[dict]] = {}
        for position, (row, record) in enumerate(zip(owners, records, strict=True)):
            for name, values in scores.items():
                background_metric = name.startswith("bg_")
                usable = record["has_mask"] and has_background[position] if background_metric else True
                record[name] = values[position] if usable else None
            by_row.setdefault(row, []).append(record)
        for row, row_records in by_row.items():
            edits_json[row] = json.dumps(row_records)

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
