"""The `inversa` command line: validate, run (resume), query, report, and submit to a token-authenticated
`ray start --head` cluster whose output must match a local run's."""

from __future__ import annotations

import base64
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_validate_prints_resolved_spec_and_rejects_bad_keys(tmp_path):
    # A cluster spec checked where its data and models are not: the spec only.
    result = runner.invoke(
        app,
        [
            "validate",
            str(ROOT / "jobs/example_sd15_cluster.yaml"),
            "--set",
            "inversion.num_steps=12",
            "--spec-only",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "num_steps: 12" in result.output and "valid" in result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "jobs/example_sd15_cluster.yaml").read_text().replace("num_steps:", "num_stepz:"))
    result = runner.invoke(app, ["validate", str(bad)])
    assert result.exit_code == 2
    assert "inversion.num_stepz" in result.output and "bad.yaml" in result.output


@pytest.mark.slow
def test_run_resumes_completed_output_and_prints_summary(clean_run, tmp_path):
    output = tmp_path / "copy"
    shutil.copytree(clean_run["output"], output)
    result = runner.invoke(app, ["run", str(clean_run["spec"]), "--output", str(output)])
    # The two complete shards are skipped; the truncated one is read again, fails again: exit 1.
    assert result.exit_code == 1, result.output
    assert re.search(r"shards complete\s+│\s+2/3", result.output), result.output
    assert "partial" in result.output and "shard-000002.tar" in result.output


@pytest.mark.slow
def test_query_counts_match_manifest(clean_run):
    output = str(clean_run["output"])
    result = runner.invoke(
        app, ["query", output, "select count(*) as n, count(distinct edit_id) as ids from edits"]
    )
    assert result.exit_code == 0, result.output
    edits = clean_run["manifest"]["counts"]["edits"]
    assert re.search(rf"│ {edits}\s+│ {edits}\s+│", result.output), result.output
    result = runner.invoke(app, ["query", output, "select stage, count(*) from errors group by 1"])
    assert "read" in result.output


@pytest.mark.slow
def test_report_embeds_every_image(clean_run, tmp_path):
    from pipeline.report import connect

    path = tmp_path / "report.html"
    result = runner.invoke(app, ["report", str(clean_run["output"]), "--path", str(path)])
    assert result.exit_code == 0, result.output
    page = path.read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    connection = connect(str(clean_run["output"]))
    sources, edits = (
        connection.sql(f"select count(*) from {t}").fetchall()[0][0] for t in ("sources", "edits")
    )
    composites = connection.sql("select count(composite_image) from edits").fetchall()[0][0]
    assert composites > 0  # the test job composites
    # Source + reconstruction per source, one per edit and one per composite.
    assert len(images) == 2 * sources + edits + composites
    assert "Composited edits (raw vs composite)" in page
    assert all(base64.b64decode(image).startswith(b"\x89PNG") for image in images)
    assert "http" not in page  # self-contained


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def token_cluster():
    """`ray start --head` with RAY_AUTH_MODE=token on free ports; yields (dashboard URL, client env)."""
    token = (
        subprocess.run(["ray", "get-auth-token", "--generate"], capture_output=True, text=True, check=True)
        .stdout.strip()
        .splitlines()[-1]
    )
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    dashboard = free_port()
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    command = ["ray", "start", "--head", "--block", "--num-cpus", "2", "--port", str(free_port()), "--dashboard-host", "127.0.0.1",
               "--dashboard-port", str(dashboard), "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
               "--metrics-export-port", str(free_port()), "--include-dashboard", "true", "--temp-dir", temp_dir, "--disable-usage-stats"]  # fmt: skip
    process = subprocess.Popen(
        command, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 240  # a loaded 2-core machine can take over 2 minutes
        while time.time() < deadline:
            probe = subprocess.run(
                [
                    "python",
                    "-c",
                    f"from ray.job_submission import JobSubmissionClient as C; C('{address}').list_jobs()",
                ],
                env=env,
                capture_output=True,
            )
            if probe.returncode == 0:
                break
            time.sleep(3)
        else:
            pytest.fail(f"ray head on {address} did not come up: {probe.stderr.decode()[-2000:]}")
        yield address, env
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


def inversa(*arguments: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["python", "-m", "pipeline.cli", *arguments], cwd=ROOT, env=env, capture_output=True, text=True
    )


@pytest.mark.slow
def test_submit_to_token_cluster_matches_local_run(clean_run, token_cluster, tmp_path):
    from test_dataflow import edit_rows

    address, env = token_cluster
    wrong_token = {**env, "RAY_AUTH_TOKEN": "wrong-token"}
    # Without RAY_AUTH_TOKEN the client reads ~/.ray/auth_token: an empty HOME has none.
    no_token = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"} | {"HOME": str(tmp_path)}
    for client_env, said in (
        (wrong_token, "Invalid authentication token"),
        (no_token, "Token authentication is enabled"),
    ):
        refused = inversa("status", "raysubmit_x", "--address", address, env=client_env)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
        [line] = refused.stdout.strip().splitlines()
        assert said in line and "RAY_AUTH_TOKEN" in line and address in line
    unknown = inversa("status", "raysubmit_nothing", "--address", address, env=env)
    assert unknown.returncode == 2 and "no job with submission id 'raysubmit_nothing'" in unknown.stdout

    output = tmp_path / "submitted"
    submitted = inversa(
        "submit", str(clean_run["spec"]), "--address", address, "--output", str(output), env=env
    )
    assert submitted.returncode == 0, submitted.stderr
    submission_id = submitted.stdout.strip().splitlines()[-1]
    status = ""
    deadline = time.time() + 500
    while time.time() < deadline:
        status = inversa("status", submission_id, "--address", address, env=env).stdout.strip()
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(5)
    logs = inversa("logs", submission_id, "--address", address, env=env).stdout
    # The test shards include a truncated one: the job is partial and exits 1, so Ray reports FAILED.
    assert status == "FAILED" and "partial:" in logs, logs[-3000:]
    assert "shards complete" in logs and "shards done 2/3, 1 failed" in logs
    # Without a terminal, progress is inversa's one line, not Ray Data's multi-line log block.
    assert "Total Progress" not in logs, logs[-3000:]
    assert edit_rows(output) == edit_rows(clean_run["output"])


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()]


def test_query_and_report_refuse_a_folder_that_is_not_an_output(tmp_path):
    own = tmp_path / "photos"
    own.mkdir()
    (own / "cat.jpg").write_bytes(b"jpeg")
    for arguments in (["query", str(own), "select count(*) from edits"], ["report", str(own)]):
        for folder in (own, tmp_path / "absent"):
            result = runner.invoke(app, [arguments[0], str(folder), *arguments[2:]])
            assert result.exit_code == 2, result.output
            [line] = error_lines(result.output)
            assert str(folder) in line and "not an inversa output" in line


def test_a_sql_error_is_one_line(tmp_path):
    from pipeline.output import OutputStore

    OutputStore(str(tmp_path / "out")).claim("a" * 64)  # an output with no rows yet
    result = runner.invoke(app, ["query", str(tmp_path / "out"), "select nonsense from edits"])
    assert result.exit_code == 2
    [line] = error_lines(result.output)
    assert "query failed" in line and "nonsense" in line
    ok = runner.invoke(app, ["query", str(tmp_path / "out"), "select count(*) as n from edits"])
    assert ok.exit_code == 0 and "0" in ok.output


@pytest.mark.parametrize("command", ["status", "logs"])
def test_an_unreachable_dashboard_is_one_line(command):
    result = runner.invoke(app, [command, "raysubmit_x", "--address", "http://127.0.0.1:9"])
    assert result.exit_code == 2
    [line] = error_lines(result.output)
    assert "cannot reach the Ray dashboard at http://127.0.0.1:9" in line and "--address" in line


def test_outputs_that_would_be_lost_are_refused_or_made_absolute(tmp_path, monkeypatch):
    import yaml
    from job_data import spec

    job = spec(tmp_path)
    for command in (["run", str(job)], ["submit", str(job), "--address", "http://127.0.0.1:9"]):
        result = runner.invoke(app, [*command, "--output", "memory://augmented"])
        assert result.exit_code == 2, result.output
        [line] = error_lines(result.output)
        assert "memory://augmented" in line and "lost" in line

    submitted = {}

    class Client:
        def submit_job(self, entrypoint, runtime_env):
            submitted.update(runtime_env["env_vars"])
            return "raysubmit_1"

    monkeypatch.setattr("pipeline.cli._client", lambda address: Client())
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["submit", str(job), "--address", "http://h:8265", "--output", "rel/out"])
    assert result.exit_code == 0, result.output
    sent = yaml.safe_load(submitted["INVERSA_JOB_SPEC"])["output"]["path"]
    assert sent == str(tmp_path / "rel/out") and "resolved to" in result.output
    # Making the path absolute keeps the rest of the output settings.
    composite = ["--set", "output.composite=true", "--set", "output.composite_feather=7"]
    result = runner.invoke(
        app, ["submit", str(job), "--address", "http://h:8265", "--output", "rel/out", *composite]
    )
    assert result.exit_code == 0, result.output
    sent = yaml.safe_load(submitted["INVERSA_JOB_SPEC"])["output"]
    assert (sent["composite"], sent["composite_feather"]) == (True, 7)


def test_run_refuses_a_factory_typo_before_ray_starts(tmp_path):
    from job_data import spec

    job = spec(tmp_path, **{"metrics.classifier": f"{ROOT / 'tests/job_data.py'}:tiny_clasifier"})
    started = time.time()
    result = runner.invoke(app, ["run", str(job)])
    assert result.exit_code == 2, result.output
    [line] = error_lines(result.output)
    assert "metrics.classifier" in line and "tiny_clasifier" in line
    assert time.time() - started < 10 and not (tmp_path / "out").exists()


def test_overwrite_deletes_nothing_when_a_check_fails(tmp_path):
    from job_data import spec

    from pipeline.output import OutputStore

    output = tmp_path / "earlier"
    OutputStore(str(output)).claim("a" * 64)
    (output / "edits").mkdir()
    (output / "edits" / "rows.parquet").write_bytes(b"rows")
    job = spec(tmp_path, **{"input.shards": [str(tmp_path / "gone-{0..2}.tar")]})
    result = runner.invoke(app, ["run", str(job), "--output", str(output), "--overwrite"])
    assert result.exit_code == 2, result.output
    [line] = error_lines(result.output)
    assert "input.shards" in line and "no shard found" in line
    assert (output / "edits" / "rows.parquet").read_bytes() == b"rows"


@pytest.mark.slow
def test_overwrite_refuses_a_folder_that_is_not_an_output(ray_local, tmp_path):
    from job_data import spec

    own = tmp_path / "mine"
    own.mkdir()
    (own / "notes.txt").write_text("keep me")
    result = runner.invoke(app, ["run", str(spec(tmp_path)), "--output", str(own), "--overwrite"])
    assert result.exit_code == 2, result.output
    [line] = error_lines(result.output)
    assert str(own) in line and "not an inversa output" in line
    assert (own / "notes.txt").read_text() == "keep me"


def test_jobs_api_failures_as_ray_raises_them_become_one_line_with_the_fix():
    from ray.exceptions import AuthenticationError

    from pipeline.cli import _jobs_api_problem

    address = "http://head:8265"
    # The exceptions and messages Ray 2.60's JobSubmissionClient raises for each case.
    cases = [
        (
            AuthenticationError("Authentication failed: Forbidden: Invalid authentication token"),
            "RAY_AUTH_TOKEN",
        ),
        (RuntimeError("Request failed with status code 404: Job raysubmit_x does not exist."), "no job with"),
        (ConnectionError(f"Failed to connect to Ray at address: {address}."), "cannot reach"),
    ]
    for error, fix in cases:
        line = _jobs_api_problem(address, "raysubmit_x", error)
        assert fix in line and address in line and "\n" not in line
