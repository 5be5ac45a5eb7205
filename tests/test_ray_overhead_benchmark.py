"""The job benchmark's inputs (benchmarks/ray_overhead.py): the spec it runs is a valid job spec whose
invert/edit actor takes a GPU exactly when the benchmark runs on one, over the shards it wrote."""

from __future__ import annotations

import tarfile

from benchmarks import ray_overhead
from pipeline.config import parse_config


def test_the_spec_is_a_valid_job_over_the_written_shards(tmp_path):
    args = ray_overhead.parse_args(
        ["--shards", "2", "--per-shard", "3", "--device", "cuda", "--precision", "mixed"]
    )
    config = parse_config(ray_overhead.job_spec(args, tmp_path))
    assert config.resources.invert_edit.num_gpus == 1.0
    assert config.model.device == "cuda" and config.model.precision == "mixed"
    shards = sorted(tmp_path.glob("shard-*.tar"))
    assert len(shards) == 2
    for shard in shards:
        with tarfile.open(shard) as archive:
            assert len({member.name.split(".")[0] for member in archive.getmembers()}) == 3


def test_on_the_cpu_no_stage_asks_for_a_gpu(tmp_path):
    config = parse_config(ray_overhead.job_spec(ray_overhead.parse_args(["--shards", "1"]), tmp_path))
    assert config.resources.invert_edit.num_gpus == 0.0 and config.model.device == "cpu"
