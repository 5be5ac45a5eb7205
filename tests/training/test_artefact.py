"""Artefacts: written and read back through fsspec, versioned by their weights, refused for another base model."""

from __future__ import annotations

import json

import fsspec
import pytest
import torch

from pipeline.training.artefact import (
    ArtefactError,
    check_base_model,
    read_artefact,
    read_manifest,
    write_artefact,
)

WEIGHTS = {"layer.weight": torch.arange(6.0).reshape(2, 3), "layer.bias": torch.ones(2)}


@pytest.mark.parametrize("root", ["memory://artefacts/a", "local"])
def test_round_trip_through_fsspec(root, tmp_path):
    uri = str(tmp_path / "a") if root == "local" else root
    version = write_artefact(uri, "diffusion_clip", WEIGHTS, {"lr": 0.1}, {"final": {"loss": 0.5}}, "f" * 64)
    artefact = read_artefact(uri, kind="diffusion_clip")
    assert artefact.version == version and artefact.base_model_fingerprint == "f" * 64
    assert artefact.config == {"lr": 0.1} and artefact.metrics == {"final": {"loss": 0.5}}
    for name, tensor in WEIGHTS.items():
        torch.testing.assert_close(artefact.weights[name], tensor)


def test_version_names_the_weights(tmp_path):
    first = write_artefact(str(tmp_path / "a"), "k", WEIGHTS, {}, {}, "f")
    same = write_artefact(str(tmp_path / "b"), "k", {**WEIGHTS}, {"other": 1}, {}, "f")
    changed = write_artefact(str(tmp_path / "c"), "k", {**WEIGHTS, "layer.bias": torch.zeros(2)}, {}, {}, "f")
    assert first == same != changed


def test_modified_weights_are_refused(tmp_path):
    uri = str(tmp_path / "a")
    write_artefact(uri, "k", WEIGHTS, {}, {}, "f")
    other = tmp_path / "b"
    write_artefact(str(other), "k", {"layer.bias": torch.zeros(2)}, {}, {}, "f")
    (tmp_path / "a" / "weights.safetensors").write_bytes((other / "weights.safetensors").read_bytes())
    with pytest.raises(ArtefactError, match="does not match its version"):
        read_artefact(uri)


def test_missing_other_kind_and_unknown_format_are_refused(tmp_path):
    with pytest.raises(ArtefactError, match="inversa train"):
        read_manifest(str(tmp_path / "nothing"))
    uri = str(tmp_path / "a")
    write_artefact(uri, "zip_encoder", WEIGHTS, {}, {}, "f")
    with pytest.raises(ArtefactError, match="not 'diffusion_clip'"):
        read_artefact(uri, kind="diffusion_clip")
    manifest = json.loads((tmp_path / "a" / "artefact.json").read_text())
    (tmp_path / "a" / "artefact.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(ArtefactError, match="version 99"):
        read_manifest(uri)


def test_an_artefact_of_another_base_model_is_refused():
    fs = fsspec.filesystem("memory")
    write_artefact("memory://artefacts/base", "k", WEIGHTS, {}, {}, "a" * 64)
    manifest = read_manifest("memory://artefacts/base")
    check_base_model(manifest, "memory://artefacts/base", "a" * 64, "model")
    with pytest.raises(
        ArtefactError, match="trained on base model aaaaaaaaaaaa.*'other-model' is bbbbbbbbbbbb"
    ):
        check_base_model(manifest, "memory://artefacts/base", "b" * 64, "other-model")
    fs.rm("/artefacts", recursive=True)
