"""The distribution benchmark picks each target class's sets from an output's tables (checked here with
pyarrow, apart from its DuckDB queries) and measures them with pipeline.metrics.distribution."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from job_rows import read_table
from output_tables import edit_row, png, source_row
from PIL import Image

from benchmarks.distribution_metrics import class_distances
from pipeline.metrics.distribution import ImageFeatures, frechet_distance
from pipeline.stages.write import shard_key, write_tables


def mean_colour() -> ImageFeatures:
    return ImageFeatures(lambda images: images.mean(dim=(2, 3)), 3, "mean-colour")


def unit(pngs: list[bytes]) -> torch.Tensor:
    arrays = np.stack([np.asarray(Image.open(io.BytesIO(data))) for data in pngs])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255


def test_each_target_class_is_compared_with_its_real_sources(tmp_path):
    rng = np.random.default_rng(0)
    sources = [source_row(f"s#{i}", "cat", i, 2) for i in range(4)]
    sources += [source_row(f"s#fox{i}", "fox", 100 + i, 0) for i in range(5)]  # real foxes, not edited
    edits = []
    for source in sources[:4]:
        for target in ("fox", "red panda"):
            row = edit_row(source, target, 0, True, rng)
            if source["source_id"] != "s#3":  # one edit had no mask: not composited
                row["composite_image"] = png(int(rng.integers(1 << 30)))
            edits.append(row)
    write_tables(str(tmp_path), shard_key("a.tar"), "d", {"edits": edits, "sources": sources, "errors": []})

    results = class_distances(str(tmp_path), mean_colour(), kid_subsets=3)

    edit_table = read_table(tmp_path, "edits").to_pylist()
    source_table = read_table(tmp_path, "sources").to_pylist()
    real = unit([row["image"] for row in source_table if row["source_class"] == "fox"])
    fox_edits = [row for row in edit_table if row["target_class"] == "fox"]
    fox = results["fox"]
    assert (fox["edits"]["images"], fox["composites"]["images"], fox["inputs"]["images"]) == (4, 3, 4)
    assert fox["edits"]["real"] == 5
    expected = frechet_distance(real, unit([row["image"] for row in fox_edits]), mean_colour())
    assert fox["edits"]["fid"] == pytest.approx(expected, rel=1e-6)
    composites = unit([row["composite_image"] for row in fox_edits if row["composite_image"] is not None])
    assert fox["composites"]["fid"] == pytest.approx(
        frechet_distance(real, composites, mean_colour()), rel=1e-6
    )
    inputs = unit([row["image"] for row in source_table if row["source_class"] == "cat"])
    assert fox["inputs"]["fid"] == pytest.approx(frechet_distance(real, inputs, mean_colour()), rel=1e-6)
    assert fox["edits"]["kid_std"] >= 0
    # No real red panda: nothing to compare with, said so rather than a number.
    assert results["red panda"]["edits"] == {
        "images": 4,
        "real": 0,
        "skipped": "needs at least 2 images on each side",
    }
