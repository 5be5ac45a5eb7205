"""A job output written directly with the project's writer (no Ray job): sources of three classes and
one without a class, edits that pass and fail the filter (one target class with a space, which the
partition folder URL-quotes), and errors of several types. Fast input for export, query and report tests."""

from __future__ import annotations

import hashlib
import json

import numpy as np

from pipeline.output import OutputStore
from pipeline.stages.rows import EDIT_METRICS
from pipeline.stages.write import encode_png, shard_key, write_tables

TARGETS = {"cat": ("fox", "red panda"), "dog": ("fox",), "bird": ("red panda",), None: ()}


def png(seed: int, size: int = 8) -> bytes:
    return encode_png(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def source_row(source_id: str, source_class: str | None, seed: int, edits: int) -> dict:
    return {
        "source_id": source_id,
        "status": "ok",
        "source_class": source_class,
        "caption": f"a photo of a {source_class}",
        "orig_width": 8,
        "orig_height": 8,
        "image": png(seed),
        "reconstruction": png(seed + 10_000),
        "recon_psnr": 30.0 + seed % 5,
        "recon_ssim": 0.9,
        "recon_lpips": 0.1,
        "inversions": None,
        "invert_seconds": 0.5,
        "edits": edits,
        "model_id": "tiny",
    }


def edit_row(source: dict, target_class: str, seed: int, passed: bool, rng: np.random.Generator) -> dict:
    edit_id = hashlib.sha256(f"{source['source_id']}|{target_class}|{seed}".encode()).hexdigest()[:32]
    clip_t = float(rng.uniform(0.1, 0.4))
    return {
        "edit_id": edit_id,
        "source_id": source["source_id"],
        "source_class": source["source_class"],
        "target_class": target_class,
        "method": "null_text",
        "source_prompt": source["caption"],
        "target_prompt": f"a photo of a {target_class}",
        "seed": seed,
        "sample_index": 0,
        "sample_seed": None,
        "sample_group": None,
        "params": json.dumps({"inversion": {"method": "null_text"}}),
        "image": png(int(edit_id[:8], 16)),
        "width": 8,
        "height": 8,
        "clip_t": clip_t,
        "clip_i": float(rng.uniform(0.5, 0.9)),
        "clip_dir": float(rng.uniform(-0.2, 0.4)),
        "lpips": float(rng.uniform(0.05, 0.5)),
        "has_mask": seed % 3 != 0,
        "clip_t_edited": None if seed % 3 == 0 else float(rng.uniform(0.1, 0.4)),
        "structure_dist": float(rng.uniform(0.001, 0.05)),
        "bg_psnr": None if seed % 3 == 0 else float(rng.uniform(20, 35)),
        "bg_mse": None,
        "bg_ssim": None if seed % 3 == 0 else float(rng.uniform(0.6, 1.0)),
        "bg_lpips": None,
        "composite_image": None,
        **{f"composite_{name}": None for name in EDIT_METRICS},
        "diversity": None,
        "diversity_bound": None,
        "classified_as": target_class if passed else source["source_class"],
        "passed_filter": passed,
        "filter_reason": None if passed else "clip_t<0.25",
        "invert_seconds": 0.5,
        "edit_seconds": 0.2,
        "model_id": "tiny",
    }


ERRORS = [
    ("read", "CorruptImage", "cannot identify image file"),
    ("read", "CorruptImage", "image file is truncated (3 bytes not processed)"),
    ("read", "MissingField", "sample has no caption (txt)"),
    ("edit", "EditError", "NaN in the edited latent at step 3"),
]


def write_output(
    output: str, sources_per_shard: int = 6, seed: int = 0, sample_groups: bool = False
) -> dict[str, list[dict]]:
    """Write two shards' worth of tables to OUTPUT; returns the rows written, per table.

    With sample_groups, the two seeds of each source and target are the two stochastic samples of one
    group (sample_index = seed), sharing the group's diversity and its bound.
    """
    rng = np.random.default_rng(seed)
    written: dict[str, list[dict]] = {"edits": [], "sources": [], "errors": []}
    classes = list(TARGETS)
    for shard in range(2):
        tables: dict[str, list[dict]] = {"edits": [], "sources": [], "errors": []}
        for index in range(sources_per_shard):
            number = shard * sources_per_shard + index
            source_class = classes[number % len(classes)]
            source_id = f"s3://bucket/shard-{shard:06d}.tar#s{shard}/img.{index}"
            targets = TARGETS[source_class]
            source = source_row(source_id, source_class, number, len(targets) * 2)
            tables["sources"].append(source)
            for target in targets:
                group = [
                    edit_row(source, target, edit_seed, bool(rng.random() < 0.6), rng) for edit_seed in (0, 1)
                ]
                if sample_groups:
                    diversity, bound = float(rng.uniform(0.01, 0.1)), float(rng.uniform(0.2, 0.4))
                    for row in group:
                        row |= {
                            "sample_group": group[0]["edit_id"],
                            "sample_index": row["seed"],
                            "sample_seed": 10 + row["seed"],
                        }
                        row |= {"diversity": diversity, "diversity_bound": bound}
                tables["edits"] += group
        for stage, error_type, message in ERRORS:
            tables["errors"].append(
                {
                    "source_id": f"s3://bucket/shard-{shard:06d}.tar#bad{len(tables['errors'])}",
                    "stage": stage,
                    "error_type": error_type,
                    "error": message,
                    "edit_id": None,
                }
            )
        write_tables(output, shard_key(f"shard-{shard:06d}.tar"), "d0", tables)
        for name, rows in tables.items():
            written[name] += rows
    # As a job does before writing rows: the spec claim that marks the folder as an inversa output.
    OutputStore(output).claim("0" * 64)
    return written
