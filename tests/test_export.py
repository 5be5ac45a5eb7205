"""`inversa export`: the edits that passed the filter (and originals at a ratio) read back exactly by
`datasets.load_from_disk` and by the `webdataset` reader; deterministic with a seed; bad requests are
one line and exit code 2. The expected rows come from the rows as written, not from the exporter."""

from __future__ import annotations

import io
import json
import urllib.request

import datasets
import numpy as np
import pytest
import webdataset as wds
from output_tables import write_output
from PIL import Image
from typer.testing import CliRunner

import pipeline
from pipeline.cli import app
from pipeline.export import ExportError, plan_export

runner = CliRunner()


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict:
    output = tmp_path_factory.mktemp("export") / "out"
    return {"output": str(output), "rows": write_output(str(output))}


def expected_edits(rows: dict) -> dict[str, dict]:
    """edit id -> (PNG bytes, label) of the edits that passed, from the rows as written."""
    return {
        row["edit_id"]: {"image": row["image"], "label": row["target_class"]}
        for row in rows["edits"]
        if row["passed_filter"]
    }


def sources_by_id(rows: dict) -> dict[str, dict]:
    return {row["source_id"]: row for row in rows["sources"]}


def read_datasets(folder) -> list[dict]:
    """Every sample of a save_to_disk export: id, kind, raw PNG bytes, decoded pixels, label name."""
    loaded = datasets.load_from_disk(str(folder))
    names = loaded.features["label"].names
    decoded = [np.asarray(image) for image in loaded["image"]]
    raw = loaded.cast_column("image", datasets.Image(decode=False))
    return [
        {
            "id": row["id"],
            "kind": row["kind"],
            "image": row["image"]["bytes"],
            "pixels": pixels,
            "label": names[row["label"]],
        }
        for row, pixels in zip(raw, decoded, strict=True)
    ]


def read_webdataset(folder) -> list[dict]:
    """Every sample of a WebDataset export, read by webdataset's own reader, in shard order."""
    summary = json.loads((folder / "export.json").read_text())
    urls = [str(folder / name) for name in summary["shards"]]
    samples = []
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        metadata = json.loads(sample["json"])
        label = summary["classes"][int(sample["cls"])]
        assert metadata["label"] == label
        samples.append(
            {"id": metadata["id"], "kind": metadata["kind"], "image": sample["png"], "label": label}
        )
    return samples


def check_samples(samples: list[dict], rows: dict, ratio: float) -> None:
    """The samples are the passed edits, each once with its bytes and target class, plus
    round(ratio x edits) distinct originals with their source image and class."""
    edits = expected_edits(rows)
    exported_edits = {s["id"]: s for s in samples if s["kind"] == "edit"}
    assert len(exported_edits) == sum(s["kind"] == "edit" for s in samples)  # no edit twice
    assert set(exported_edits) == set(edits)
    for edit_id, sample in exported_edits.items():
        assert sample["image"] == edits[edit_id]["image"]
        assert sample["label"] == edits[edit_id]["label"]
    originals = [s for s in samples if s["kind"] == "original"]
    assert len(originals) == round(ratio * len(edits))
    assert len({s["id"] for s in originals}) == len(originals)
    sources = sources_by_id(rows)
    for sample in originals:
        assert sample["image"] == sources[sample["id"]]["image"]
        assert sample["label"] == sources[sample["id"]]["source_class"] is not None


def test_datasets_export_reads_back_the_passed_edits(written, tmp_path):
    pipeline.export_output(written["output"], str(tmp_path / "hf"), "datasets", shard_size=7)
    samples = read_datasets(tmp_path / "hf")
    check_samples(samples, written["rows"], 0.0)
    for sample in samples:  # the pixels, not just the bytes
        assert np.array_equal(sample["pixels"], np.asarray(Image.open(io.BytesIO(sample["image"]))))
    assert len(list((tmp_path / "hf").glob("data-*.arrow"))) == -(-len(samples) // 7)


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_webdataset_export_mixes_originals_at_the_ratio(written, tmp_path, ratio):
    summary = pipeline.export_output(
        written["output"], str(tmp_path / "wds"), "webdataset", originals_ratio=ratio, shard_size=5
    )
    samples = read_webdataset(tmp_path / "wds")
    check_samples(samples, written["rows"], ratio)
    assert [
        len(list(wds.WebDataset(str(tmp_path / "wds" / n), shardshuffle=False))) for n in summary["shards"]
    ][:-1] == [5] * (len(summary["shards"]) - 1)
    assert summary["counts"]["samples"] == len(samples)


def test_both_formats_hold_the_same_samples_in_the_same_order(written, tmp_path):
    pipeline.export_output(written["output"], str(tmp_path / "hf"), "datasets", originals_ratio=0.5, seed=3)
    pipeline.export_output(
        written["output"], str(tmp_path / "wds"), "webdataset", originals_ratio=0.5, seed=3
    )
    from_datasets = [(s["id"], s["image"], s["label"]) for s in read_datasets(tmp_path / "hf")]
    from_webdataset = [(s["id"], s["image"], s["label"]) for s in read_webdataset(tmp_path / "wds")]
    assert from_datasets == from_webdataset


def test_export_is_deterministic_in_the_seed(written, tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        pipeline.export_output(
            written["output"],
            str(tmp_path / name),
            "webdataset",
            originals_ratio=0.5,
            seed=seed,
            shard_size=4,
        )
    shards = {name: sorted((tmp_path / name).glob("*.tar")) for name in "abc"}
    assert [p.read_bytes() for p in shards["a"]] == [p.read_bytes() for p in shards["b"]]
    order = {name: [s["id"] for s in read_webdataset(tmp_path / name)] for name in "ac"}
    assert order["a"] != order["c"] and sorted(order["a"]) != order["a"]  # shuffled, by the seed
    originals = {
        name: {s["id"] for s in read_webdataset(tmp_path / name) if s["kind"] == "original"} for name in "ac"
    }
    assert originals["a"] != originals["c"]


def test_originals_never_come_from_sources_without_a_class(written):
    plan = plan_export(written["output"], originals_ratio=0.0)
    with_class = sum(row["source_class"] is not None for row in written["rows"]["sources"])
    assert with_class < len(written["rows"]["sources"])
    full = plan_export(written["output"], originals_ratio=with_class / len(plan.edit_ids))
    assert set(full.original_ids) == {
        row["source_id"] for row in written["rows"]["sources"] if row["source_class"] is not None
    }


def test_bad_export_requests_are_one_line_and_exit_2(written, tmp_path):
    edits = len(expected_edits(written["rows"]))
    with_class = sum(row["source_class"] is not None for row in written["rows"]["sources"])
    with pytest.raises(ExportError, match=f"{with_class} sources with a class"):
        plan_export(written["output"], originals_ratio=(with_class + 1) / edits)
    cases = [
        (["--originals-ratio", "5"], "sources with a class"),
        (["--originals-ratio", "-1"], "must be >= 0"),
        (["--format", "parquet"], "unknown export format"),
        (["--shard-size", "0"], "--shard-size must be >= 1"),
    ]
    for arguments, message in cases:
        result = runner.invoke(app, ["export", written["output"], str(tmp_path / "x"), *arguments])
        assert result.exit_code == 2, result.output
        assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    result = runner.invoke(app, ["export", written["output"], str(tmp_path / "full")])
    assert result.exit_code == 2 and "not empty" in result.output
    assert (tmp_path / "full" / "keep.txt").exists()
    result = runner.invoke(app, ["export", written["output"], str(tmp_path / "full"), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "full" / "keep.txt").exists()


def test_an_output_where_nothing_passed_is_refused(tmp_path):
    output = tmp_path / "out"
    rows = write_output(str(output))
    for path in (output / "edits").rglob("*.parquet"):
        path.unlink()
    with pytest.raises(ExportError, match="none of its 0 edits passed"):
        plan_export(str(output))
    assert rows["edits"]


@pytest.fixture()
def s3_endpoint(monkeypatch):
    """A moto S3 server on a free port; s3:// URLs reach it through AWS_ENDPOINT_URL."""
    import socket

    import s3fs
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    # moto keeps its buckets per process, not per server: start each test from none.
    urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/moto-api/reset", method="POST"))
    for name, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }.items():
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir("inversa")
    yield "s3://inversa"
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def test_export_from_and_to_s3(s3_endpoint, tmp_path):
    """The output is read, and both exports written, through fsspec; load_from_disk reads from s3 too."""
    rows = write_output(f"{s3_endpoint}/out")
    pipeline.export_output(f"{s3_endpoint}/out", f"{s3_endpoint}/hf", "datasets", originals_ratio=0.5)
    pipeline.export_output(f"{s3_endpoint}/out", f"{s3_endpoint}/wds", "webdataset", originals_ratio=0.5)
    loaded = datasets.load_from_disk(f"{s3_endpoint}/hf").cast_column("image", datasets.Image(decode=False))
    names = loaded.features["label"].names
    check_samples(
        [
            {"id": r["id"], "kind": r["kind"], "image": r["image"]["bytes"], "label": names[r["label"]]}
            for r in loaded
        ],
        rows,
        0.5,
    )
    import s3fs

    s3fs.S3FileSystem().get(f"{s3_endpoint}/wds/", str(tmp_path / "wds"), recursive=True)
    check_samples(read_webdataset(tmp_path / "wds"), rows, 0.5)


@pytest.mark.slow
def test_export_of_a_real_job_round_trips(clean_run, tmp_path):
    from test_dataflow import read_table

    rows = {name: read_table(clean_run["output"], name).to_pylist() for name in ("edits", "sources")}
    passed = sum(row["passed_filter"] for row in rows["edits"])
    assert 0 < passed == clean_run["manifest"]["counts"]["passed"]
    with_class = sum(row["source_class"] is not None for row in rows["sources"])
    ratio = round(with_class / passed, 2) if with_class < passed else 1.0
    output = str(clean_run["output"])
    pipeline.export_output(output, str(tmp_path / "hf"), "datasets", originals_ratio=ratio, seed=5)
    pipeline.export_output(
        output, str(tmp_path / "wds"), "webdataset", originals_ratio=ratio, seed=5, shard_size=3
    )
    from_datasets, from_webdataset = read_datasets(tmp_path / "hf"), read_webdataset(tmp_path / "wds")
    check_samples(from_datasets, rows, ratio)
    check_samples(from_webdataset, rows, ratio)
    assert [s["id"] for s in from_datasets] == [s["id"] for s in from_webdataset]
    for sample in from_datasets:
        assert sample["pixels"].shape == (32, 32, 3)


def test_relations_and_report_read_an_s3_output(s3_endpoint):
    """DuckDB reads s3:// through fsspec (no httpfs extension to download)."""
    import s3fs

    from pipeline.report import write_report

    rows = write_output(f"{s3_endpoint}/out")
    passed = pipeline.open_table(f"{s3_endpoint}/out", "edits").filter("passed_filter").aggregate("count(*)")
    assert passed.fetchall()[0][0] == len(expected_edits(rows))
    page = s3fs.S3FileSystem().cat_file(write_report(f"{s3_endpoint}/out")).decode()
    assert page.count('src="data:image/png;base64,') == 2 * len(rows["sources"]) + len(rows["edits"])
