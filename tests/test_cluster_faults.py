"""Faults on a two-node Ray cluster (head + worker on this machine, token authentication): an actor of
the pool killed mid-job, and the whole worker node killed mid-job. After Ray's retries and at most one
rerun the output holds exactly the rows of an uninterrupted run, and a run that did not finish says so.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cluster import TwoNodeCluster, two_node_cluster
from job_rows import actual_rows, ended_as_an_uninterrupted_run, expected_rows, truncated_shards

from pipeline.config import load_config

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
# The GCS declares a silent node dead after 3 missed 1 s health checks (default 5 x 3 s).
FAST_FAILURE_DETECTION = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}
# Two 1-CPU edit actors, which Ray Data spreads over the nodes; the head alone can hold the whole job
# (2 + 0.5 score + 0.5 tasks), so the job can finish after the worker node is gone.
RESOURCES = {
    "preprocess": {"batch_size": 1},  # small blocks, so that the edit actors share the rows
    "invert_edit": {"batch_size": 1, "actors": 2, "num_cpus": 1},
    "score": {"batch_size": 2, "actors": 1, "num_cpus": 0.5},
    "write": {"batch_size": 2, "num_cpus": 0.5},
}
EDIT_ACTOR = "InvertEditActor"
JOB_SECONDS = 240


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One cluster for the module; the test that kills the worker node comes last."""
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)]), **FAST_FAILURE_DETECTION}
    with two_node_cluster(
        tmp_path_factory.mktemp("cluster"),
        head_cpus=3,
        worker_cpus=2,
        worker_resources={"node_b": 1},
        extra_env=env,
    ) as started:
        yield started


def start_job(cluster: TwoNodeCluster, spec: Path, log: Path) -> subprocess.Popen:
    """`inversa run SPEC --address CLUSTER` as its own driver process."""
    with log.open("a") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "run", str(spec), "--address", cluster.address],
            cwd=ROOT,
            env=cluster.env,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )


def finish(process: subprocess.Popen, log: Path) -> int:
    """The driver's exit code; a driver still running after JOB_SECONDS fails the test (a hung job)."""
    try:
        return process.wait(JOB_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail(f"the job hung; driver log:\n{log.read_text()[-4000:]}")


def wait_for(condition, what: str, process: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the job ended before {what}; driver log:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"no {what} after {timeout:.0f} s; driver log:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)


def completed_shards(output: Path) -> list[Path]:
    markers = output / "_shards"
    return (
        [path for path in markers.glob("*.json") if not path.name.startswith("_")] if markers.exists() else []
    )


def run_with_fault(cluster, spec: Path, output: Path, fault, truncated: set[str]) -> list[int]:
    """Run the job, call `fault()` while an edit actor on the worker node processes a batch, and rerun
    once if the run did not end well. Returns the runs' exit codes."""
    log = output.parent / f"{output.name}.log"
    process = start_job(cluster, spec, log)
    busy = lambda: cluster.worker.actor_pids(EDIT_ACTOR, busy=True)  # noqa: E731
    wait_for(busy, "edit actor at work on the worker node", process, log)
    fault()
    assert len(completed_shards(output)) < 3, "the fault came too late to interrupt the job"
    codes = [finish(process, log)]
    # The test shards hold one truncated shard, so even a run without faults ends `partial` (exit 1)
    # with that shard recorded as failed; anything else calls for the one rerun.
    if not ended_as_an_uninterrupted_run(str(output), codes[0], truncated):
        codes.append(finish(start_job(cluster, spec, log), log))
    assert ended_as_an_uninterrupted_run(str(output), codes[-1], truncated), log.read_text()[-4000:]
    return codes


def truncated_urls(job_assets) -> set[str]:
    return truncated_shards(job_assets["samples"], {path.name: str(path) for path in job_assets["shards"]})


def assert_rows_of_an_uninterrupted_run(job_assets, spec: Path, output: Path) -> None:
    shard_urls = {path.name: str(path) for path in job_assets["shards"]}
    expected = expected_rows(job_assets["samples"], shard_urls, load_config(spec))
    actual = actual_rows(str(output))
    edit_ids = actual.pop("edit_ids")
    assert len(edit_ids) == len(set(edit_ids)) == len(expected["edits"])  # no edit_id twice, none missing
    assert actual == expected


def test_killed_pool_actor_is_replaced_and_no_row_is_lost_or_doubled(
    cluster, job_assets, write_job_spec, tmp_path
):
    output = tmp_path / "actor-killed"
    spec = write_job_spec(output, resources=RESOURCES)

    def kill_an_edit_actor():
        pids = cluster.worker.actor_pids(EDIT_ACTOR, busy=True) or cluster.worker.actor_pids(EDIT_ACTOR)
        assert pids, "no edit actor left on the worker node to kill"
        os.kill(pids[0], signal.SIGKILL)

    codes = run_with_fault(cluster, spec, output, kill_an_edit_actor, truncated_urls(job_assets))
    print("exit codes of the runs:", codes)
    assert_rows_of_an_uninterrupted_run(job_assets, spec, output)


def test_lost_worker_node_ends_with_the_rows_of_an_uninterrupted_run(
    cluster, job_assets, write_job_spec, tmp_path
):
    output = tmp_path / "node-killed"
    spec = write_job_spec(output, resources=RESOURCES)
    codes = run_with_fault(cluster, spec, output, cluster.worker.kill, truncated_urls(job_assets))
    print("exit codes of the runs:", codes)
    assert cluster.worker.tree() == []  # the node is gone, not only paused
    assert_rows_of_an_uninterrupted_run(job_assets, spec, output)
