"""Input shards and outputs on s3:// (an S3-compatible server started by the tests): whole-object writes,
bounded retries of transient errors, markers other processes wrote, DuckDB over s3, and a real job that
reads its shards from s3:// and writes and resumes its output there."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import fsspec
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem
from job_rows import (
    actual_rows,
    ended_as_an_uninterrupted_run,
    expected_rows,
    read_table,
    truncated_shards,
)

from pipeline.config import load_config
from pipeline.output import OutputStore
from pipeline.report import connect
from pipeline.stages.write import write_tables
from pipeline.storage import ATTEMPTS, write_bytes

# The S3 requests that create or remove objects (s3fs method names).
WRITE_REQUESTS = {
    "put_object",
    "copy_object",
    "delete_object",
    "delete_objects",
    "create_multipart_upload",
    "upload_part",
    "upload_part_copy",
    "complete_multipart_upload",
}


def error_rows(count: int) -> list[dict]:
    return [
        {
            "source_id": f"s3://in/shard.tar#k{i}",
            "stage": "read",
            "error_type": "X",
            "error": "e",
            "edit_id": None,
        }
        for i in range(count)
    ]


def objects(url: str) -> list[str]:
    """Every object under `url`, asked through a filesystem with no cached listings."""
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    root = url.removeprefix("s3://")
    return sorted(fs.find(root)) if fs.exists(root) else []


def fail_requests(monkeypatch, url: str, error: OSError, which) -> list[str]:
    """Make the S3 write requests numbered in `which` (1-based) through `url`'s filesystem raise
    `error`, as a request s3fs gave up on after its own retries would. Returns the write requests made."""
    fs, _ = fsspec.core.url_to_fs(url)
    original = fs._call_s3
    made: list[str] = []

    async def flaky(method, *args, **kwargs):
        if method in WRITE_REQUESTS:
            made.append(method)
            if len(made) in which:
                raise error
        return await original(method, *args, **kwargs)

    monkeypatch.setattr(fs, "_call_s3", flaky)
    return made


@pytest.mark.parametrize("failing_request", [1, 2])
def test_a_transient_failure_of_any_write_request_still_writes_each_row_once(
    s3_bucket, monkeypatch, failing_request
):
    output = f"{s3_bucket}/out"
    fail_requests(monkeypatch, output, ConnectionResetError("connection reset by peer"), {failing_request})
    written = write_tables(
        output, "shard-key", "digest", {"edits": [], "sources": [], "errors": error_rows(3)}
    )

    assert objects(output) == [f"{output.removeprefix('s3://')}/{path}" for path in written]
    assert sorted(read_table(output, "errors").column("source_id").to_pylist()) == sorted(
        row["source_id"] for row in error_rows(3)
    )


def test_a_marker_survives_a_transient_failure_and_is_whole(s3_bucket, monkeypatch):
    store = OutputStore(f"{s3_bucket}/out")
    fail_requests(monkeypatch, store.output, TimeoutError("read timed out"), {1})
    store.write_json("_shards/one.json", {"shard": "s3://in/one.tar", "rows": 3})
    assert objects(store.output) == [store.path("_shards/one.json")]
    assert store.markers() == {"s3://in/one.tar": {"shard": "s3://in/one.tar", "rows": 3}}


def test_retries_are_bounded_and_permanent_errors_are_not_retried(s3_bucket, monkeypatch):
    fs, root = fsspec.core.url_to_fs(f"{s3_bucket}/out")
    made = fail_requests(monkeypatch, f"{s3_bucket}/out", ConnectionResetError("reset"), range(1, 100))
    with pytest.raises(ConnectionResetError):
        write_bytes(fs, f"{root}/file", b"data", first_delay=0.01)
    assert len(made) == ATTEMPTS

    made = fail_requests(monkeypatch, f"{s3_bucket}/out", PermissionError("access denied"), range(1, 100))
    with pytest.raises(PermissionError):
        write_bytes(fs, f"{root}/file", b"data", first_delay=0.01)
    assert len(made) == 1
    assert objects(f"{s3_bucket}/out") == []


@pytest.mark.parametrize("where", ["s3", "local"])
def test_a_writer_dying_mid_file_leaves_no_file(s3_bucket, tmp_path, monkeypatch, where):
    output = f"{s3_bucket}/out" if where == "s3" else str(tmp_path / "out")

    def dies_half_way(table, where, **kwargs):
        sink = where if hasattr(where, "write") else open(where, "wb")  # noqa: SIM115
        sink.write(b"PAR1 half a file")
        raise MemoryError("killed while writing")

    monkeypatch.setattr(pq, "write_table", dies_half_way)
    with pytest.raises(MemoryError):
        write_tables(output, "shard-key", "digest", {"edits": [], "sources": [], "errors": error_rows(2)})
    fs, root = fsspec.core.url_to_fs(output)
    left = fs.find(root) if fs.exists(root) else []
    assert left == []


def test_markers_written_by_another_process_are_seen(s3_bucket):
    store = OutputStore(f"{s3_bucket}/out")
    store.write_json("_shards/one.json", {"shard": "s3://in/one.tar"})
    assert set(store.markers()) == {"s3://in/one.tar"}
    # A second driver writes through its own filesystem instance.
    other = fsspec.filesystem("s3", skip_instance_cache=True)
    other.pipe_file(store.path("_shards/two.json"), json.dumps({"shard": "s3://in/two.tar"}).encode())
    assert set(OutputStore(store.output).markers()) == {"s3://in/one.tar", "s3://in/two.tar"}


def test_duckdb_reads_the_tables_on_s3(s3_bucket):
    output = f"{s3_bucket}/out"
    write_tables(output, "a", "digest", {"edits": [], "sources": [], "errors": error_rows(3)})
    write_tables(output, "b", "digest", {"edits": [], "sources": [], "errors": error_rows(2)})
    expected = sorted(read_table(output, "errors").column("source_id").to_pylist())
    assert len(expected) == 5
    rows = connect(output).sql("select source_id from errors order by source_id").fetchall()
    assert [row[0] for row in rows] == expected


class FullDisk(LocalFileSystem):
    """A local filesystem whose disk fills up half-way through every file."""

    def open(self, path, mode="rb", **kwargs):
        handle = super().open(path, mode, **kwargs)
        if "w" in mode:

            def write_half(data):
                handle.__class__.write(handle, data[: len(data) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")

            handle.write = write_half
        return handle


def test_a_local_write_failing_half_way_leaves_no_partial_file(tmp_path):
    fs = FullDisk(skip_instance_cache=True)
    with pytest.raises(OSError, match="No space"):
        write_bytes(fs, str(tmp_path / "table" / "file.parquet"), b"0123456789", attempts=2, first_delay=0.0)
    assert list((tmp_path / "table").iterdir()) == []


def inversa(*arguments: str) -> subprocess.CompletedProcess:
    """The CLI in a fresh process: its local Ray's workers inherit this environment (the AWS_* variables)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.path.join(root, "tests")])}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *arguments],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_job_reads_shards_from_s3_writes_and_resumes_there(s3_bucket, job_assets, write_job_spec, tmp_path):
    fs = fsspec.filesystem("s3")
    shard_urls = {}
    for path in job_assets["shards"]:
        shard_urls[path.name] = f"{s3_bucket}/shards/{path.name}"
        fs.put_file(str(path), shard_urls[path.name].removeprefix("s3://"))
    output = f"{s3_bucket}/job/out"
    spec = write_job_spec(
        tmp_path / "s3-job", input={"shards": [f"{s3_bucket}/shards/shard-{{000000..000002}}.tar"]}
    )
    # 5 samples: the first shard complete, one row of the second written, the third not started.
    first = inversa("run", str(spec), "--output", output, "--limit", "5")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    first_manifest = json.loads(fs.cat_file(f"{output}/manifest.json"))
    assert first_manifest["shards"]["complete"] == [shard_urls["shard-000000.tar"]]

    second = inversa("run", str(spec), "--output", output)
    # Every shard done but the one built truncated, which stays recorded as failed: status partial.
    truncated = truncated_shards(job_assets["samples"], shard_urls)
    assert truncated == {shard_urls["shard-000002.tar"]}
    assert ended_as_an_uninterrupted_run(output, second.returncode, truncated), (
        second.stdout[-3000:] + second.stderr[-3000:]
    )
    manifest = json.loads(fs.cat_file(f"{output}/manifest.json"))
    assert manifest["shards"]["skipped_as_complete"] == 1
    # Without a terminal, progress is inversa's one line, not Ray Data's multi-line log block.
    assert "shards done 3/3" not in second.stdout and "shards done 2/3, 1 failed" in second.stdout
    assert "Total Progress" not in second.stdout + second.stderr, second.stderr[-3000:]

    config = load_config(spec, [f"output.path={output}"])
    expected = expected_rows(job_assets["samples"], shard_urls, config)
    actual = actual_rows(output)
    assert len(set(actual.pop("edit_ids"))) == len(expected["edits"])  # no edit_id twice, none missing
    assert actual == expected
    assert not [path for path in fs.find(output.removeprefix("s3://")) if path.endswith(".tmp")]
    ((count,),) = connect(output).sql("select count(*) from edits").fetchall()
    assert count == len(expected["edits"]) == manifest["counts"]["edits"]
