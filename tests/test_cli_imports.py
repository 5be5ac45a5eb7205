"""`inversa --help`, `validate` and `submit` run on a machine without the GPU stack: they never import
torch, diffusers or ray.data (checked in a subprocess where importing them fails)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("torch", "diffusers", "ray.data", "transformers", "open_clip")

RUNNER = textwrap.dedent(
    """
    import sys

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + ".") for b in {blocked!r}):
                raise ImportError("blocked import: " + name)
            return None

    sys.meta_path.insert(0, Blocker())
    sys.argv = ["inversa", *{arguments!r}]
    from pipeline.cli import app
    app()
    """
)


def _run(arguments: list[str]) -> subprocess.CompletedProcess:
    code = RUNNER.format(blocked=BLOCKED, arguments=arguments)
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.fixture
def spec(tmp_path) -> Path:
    data = {
        "input": {"shards": "data/shard-{000000..000001}.tar"},
        "model": {"path": "runwayml/stable-diffusion-v1-5"},
        "inversion": {"method": "prompt_tuning", "num_steps": 10},
        "edits": [
            {"target_class": "fox", "control": {"mode": "replace", "cross_replace_words": [["fox", 0.3]]}}
        ],
        "output": {"path": str(tmp_path / "out")},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_the_blocker_blocks():
    result = subprocess.run(
        [sys.executable, "-c", RUNNER.format(blocked=BLOCKED, arguments=[]).replace("app()", "import torch")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert "blocked import: torch" in result.stderr


def test_help_imports_no_gpu_stack():
    result = _run(["--help"])
    assert result.returncode == 0, result.stderr
    assert "submit" in result.stdout and "blocked import" not in result.stderr


def test_validate_imports_no_gpu_stack(spec):
    result = _run(["validate", str(spec), "--spec-only"])
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout and "learning_rate: 0.1" in result.stdout  # the method's defaults
    # The deep checks too: the spec's shards and model are absent here, which they report in one line
    # each, without needing torch or open_clip.
    result = _run(["validate", str(spec)])
    assert result.returncode == 2, result.stderr
    assert (
        "input.shards: 2 not found (2 shard URLs resolved)" in result.stdout and "model.path" in result.stdout
    )
    assert "blocked import" not in result.stderr + result.stdout and "Traceback" not in result.stderr


def test_submit_imports_no_gpu_stack(spec):
    # Nothing listens on port 9: submit gets as far as contacting the cluster, then fails to connect.
    result = _run(["submit", str(spec), "--address", "http://127.0.0.1:9"])
    assert result.returncode != 0
    assert "blocked import" not in result.stderr + result.stdout, result.stderr[-2000:]
