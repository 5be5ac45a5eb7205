"""Metrics actor: the per-edit metrics of every edit (PIE-Bench's definitions where it has one), PSNR/
SSIM/LPIPS of every reconstruction, and with output.composite each edit composited into its source.
Backbones come from the job's metrics config and are recorded in every edit's params and in the
manifest.

Adds per row: recon_psnr, recon_ssim, recon_lpips (float32, NaN when not computed), composite_images
(`pipeline.stages.rows`), and inside each entry of edits_json:
    clip_t, clip_i, clip_dir       CLIP-T of the edit and its target prompt, CLIP-I edit vs source,
                                   directional CLIP (`pipeline.metrics.clip`)
    clip_t_edited                  CLIP-T of the edited region only (pixels outside the edit mask black)
    lpips                          perceptual distance edit vs source (metrics.perceptual)
    structure_dist                 self-similarity distance of the CLIP vision tower's patch tokens
    bg_psnr, bg_mse, bg_ssim,      edit vs source outside the edit mask (bg_lpips is NS-LPIPS);
    bg_lpips                       bg_psnr is +inf when the background is unchanged to the last bit
    composited                     whether the edit was composited (output.composite and a mask)
    composite_<metric>             each metric above again for the composited image; null when not
                                   composited
    diversity, diversity_bound     eq. 5 of Park et al.: the mean pairwise perceptual distance among the
                                   stochastic samples of the edit's sample_group, and their mean
                                   distance to the source; null for deterministic edits
    classified_as                  the class metrics.classifier reads in the edited image (null without one)
Metrics of a region are null when undefined: clip_t_edited and the bg_* metrics when the engine gave no
mask (has_mask false), clip_t_edited when the mask is empty, the bg_* metrics when the mask covers the
whole image. When a batch cannot be scored, its ok rows become "score_failed" with a score failure
(`pipeline.stages.rows.mark_failed`).
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch

from pipeline.config import MetricsConfig, OutputConfig
from pipeline.factories import load_factory
from pipeline.models.device import resolve_device
from pipeline.stages.rows import (
    CAPTION,
    COMPOSITE_IMAGES,
    COMPOSITE_PREFIX,
    EDIT_IMAGES,
    EDIT_MASKS,
    EDIT_METRICS,
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


def to_channels_first(images: np.ndarray, device: str) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> uint8 (B, 3, H, W) on `device`."""
    return torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2)


def to_unit_float(images: np.ndarray, device: str) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [0, 1]."""
    return to_channels_first(images, device).float() / 255.0


def _values(tensor: torch.Tensor) -> list[float | None]:
    """Floats, with None for NaN (undefined, e.g. an empty region); +inf (identical pixels) is kept."""
    return [None if np.isnan(value) else float(value) for value in tensor.detach().double().cpu().numpy()]


def _defined_regions(has_mask: np.ndarray, edit_mask: torch.Tensor) -> dict[str, np.ndarray]:
    """Per region metric, which edits it is defined for: the bg_* metrics need a mask that leaves some
    background, clip_t_edited a mask (an empty one gives NaN, hence null, by itself)."""
    has_background = (~edit_mask).flatten(1).any(dim=1).cpu().numpy()
    regions = {name: has_mask & has_background for name in EDIT_METRICS if name.startswith("bg_")}
    return regions | {"clip_t_edited": has_mask}


class ScoreActor:
    """Ray Data callable class; CLIP and LPIPS models are loaded once per actor.

    Args:
        metrics: the job's metrics config.
        output: the job's output config (its composite settings); None = no compositing.
    """

    def __init__(self, metrics: MetricsConfig, output: OutputConfig | None = None):
        from pipeline.metrics import ClipScorer, build_perceptual

        self.composite = output if output is not None and output.composite else None
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
        # The raw edits until compositing replaces them: every row gets the column, whatever its status.
        composites = np.empty(count, dtype=object)
        for row, images in enumerate(batch[EDIT_IMAGES]):
            composites[row] = images

        rows = [i for i in range(count) if batch[STATUS][i] == OK]
        if rows:
            try:
                source = to_unit_float(batch[IMAGE][rows], self.device)
                recon = to_unit_float(batch[RECON][rows], self.device)
                recon_metrics[RECON_PSNR][rows] = psnr(recon, source).float().cpu().numpy()
                recon_metrics[RECON_SSIM][rows] = ssim(recon, source).float().cpu().numpy()
                recon_metrics[RECON_LPIPS][rows] = self.perceptual(recon, source).float().cpu().numpy()
                self._score_edits(batch, rows, edits_json, composites)
            except Exception as error:  # one bad batch must not fail the job: its rows fail scoring
                for row in rows:
                    mark_failed(BatchRow(batch, row), Failure.from_error("score", error))
        batch.update(recon_metrics)
        batch[EDITS_JSON] = edits_json
        batch[COMPOSITE_IMAGES] = composites
        batch[STAGE_SECONDS] = batch[STAGE_SECONDS] + (time.perf_counter() - started) / count
        return batch

    def _score_edits(
        self, batch: dict, rows: list[int], edits_json: np.ndarray, composites: np.ndarray
    ) -> None:
        """Score all edits of `rows` in one batched pass per metric; composite them first when asked."""
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
        texts = (source_texts, [record["target_prompt"] for record in records])
        source = to_unit_float(np.stack(sources), self.device)
        edit_mask = torch.from_numpy(np.stack(masks)).to(self.device)
        has_mask = np.array([bool(record["has_mask"]) for record in records])
        defined = _defined_regions(has_mask, edit_mask)
        edit_array = np.stack(edited)
        edit = to_unit_float(edit_array, self.device)
        scores = self._edit_metrics(source, edit, edit_mask, texts, defined)
        scores["classified_as"] = self._classify(edit)
        diversity = self._diversity(owners, records, edit, scores["lpips"])
        scores["diversity"] = [value for value, _ in diversity]
        scores["diversity_bound"] = [bound for _, bound in diversity]
        composited = has_mask & (self.composite is not None)
        scores["composited"] = composited.tolist()
        scores |= self._composite_metrics(
            np.stack(sources), edit_array, edit_mask, texts, defined, composited
        )
        by_row: dict[int, list[dict]] = {}
        for position, (row, record) in enumerate(zip(owners, records, strict=True)):
            record.update({name: values[position] for name, values in scores.items()})
            by_row.setdefault(row, []).append(record)
        start = 0
        for row, row_records in by_row.items():
            edits_json[row] = json.dumps(row_records)
            composites[row] = edit_array[start : start + len(row_records)]
            start += len(row_records)

    def _composite_metrics(
        self,
        sources: np.ndarray,
        edits: np.ndarray,
        edit_mask: torch.Tensor,
        texts: tuple[list[str], list[str]],
        defined: dict[str, np.ndarray],
        composited: np.ndarray,
    ) -> dict[str, list]:
        """Composite the edits that have a mask into their sources (in place in `edits`, uint8) and score
        them: COMPOSITE_PREFIX + metric, null for the edits not composited."""
        from pipeline.diffusion.masks import composite

        scores: dict[str, list] = {COMPOSITE_PREFIX + name: [None] * len(edits) for name in EDIT_METRICS}
        if not composited.any():
            return scores
        chosen = np.flatnonzero(composited)
        index = torch.from_numpy(chosen).to(self.device)
        blended = composite(
            to_channels_first(sources[chosen], self.device),
            to_channels_first(edits[chosen], self.device),
            edit_mask[index],
            self.composite.composite_dilation,
            self.composite.composite_feather,
        )
        edits[chosen] = blended.permute(0, 2, 3, 1).cpu().numpy()
        chosen_texts = tuple([text[i] for i in chosen] for text in texts)
        values = self._edit_metrics(
            to_unit_float(sources[chosen], self.device),
            to_unit_float(edits[chosen], self.device),
            edit_mask[index],
            chosen_texts,
            {name: usable[chosen] for name, usable in defined.items()},
        )
        for name, metric_values in values.items():
            for position, value in zip(chosen, metric_values, strict=True):
                scores[COMPOSITE_PREFIX + name][position] = value
        return scores

    def _edit_metrics(
        self,
        source: torch.Tensor,
        edit: torch.Tensor,
        edit_mask: torch.Tensor,
        texts: tuple[list[str], list[str]],
        defined: dict[str, np.ndarray],
    ) -> dict[str, list[float | None]]:
        """EDIT_METRICS of edits (B, 3, H, W) against their sources; None where `defined` says the metric's
        region does not exist (`_defined_regions`)."""
        from pipeline.metrics import mse, psnr, ssim
        from pipeline.metrics.structure import patch_tokens, structure_distance

        source_texts, target_texts = texts
        background = ~edit_mask
        values = {
            "clip_t": self.clip.clip_t(edit, target_texts),
            "clip_t_edited": self.clip.clip_t_edited(edit, target_texts, edit_mask),
            "clip_i": self.clip.clip_i(edit, source),
            "clip_dir": self.clip.clip_dir(source, edit, source_texts, target_texts),
            "lpips": self.perceptual(edit, source),
            "structure_dist": structure_distance(
                patch_tokens(self.clip.image_tokens(edit)), patch_tokens(self.clip.image_tokens(source))
            ),
            "bg_psnr": psnr(edit, source, mask=background),
            "bg_mse": mse(edit, source, mask=background),
            "bg_ssim": ssim(edit, source, mask=background),
            "bg_lpips": self.perceptual(edit, source, mask=background),
        }
        scores = {}
        for name, tensor in values.items():
            usable = defined.get(name, np.ones(len(edit), dtype=bool))
            scores[name] = [
                value if keep else None for value, keep in zip(_values(tensor), usable, strict=True)
            ]
        return scores

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
