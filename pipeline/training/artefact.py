"""Trained artefacts: weights + config + metrics + the fingerprint of the base model they were trained on.

One folder per artefact, written and read through fsspec (a local path or any URI fsspec knows):

    URI/weights.safetensors   the trained tensors (a task's own naming: full weights or adapters)
    URI/artefact.json         {"format": "inversa-artefact", "format_version": 1, "kind": ...,
                               "version": sha256 of weights.safetensors, "base_model_fingerprint": ...,
                               "config": {...}, "metrics": {...}}

`version` names the weights' content: two artefacts with the same version hold the same tensors. The
JSON is written last, so a folder without it is an unfinished write, never a usable artefact.
Augmentation specs reference artefacts by URI; `check_base_model` refuses one trained on another base
model (DiffusionCLIP editors, ZIP encoders and embedding VAEs all depend on the exact base weights).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import fsspec

from pipeline.storage import write_bytes

if TYPE_CHECKING:  # torch is imported where weights are read or written: manifests need no torch
    import torch

FORMAT = "inversa-artefact"
FORMAT_VERSION = 1
WEIGHTS_NAME = "weights.safetensors"
MANIFEST_NAME = "artefact.json"
DIFFUSION_CLIP_KIND = "diffusion_clip"  # a DiffusionCLIP editor (`pipeline.training.diffusion_clip`)
ZIP_ENCODER_KIND = "zip_encoder"  # a ZIP attribute encoder (`pipeline.training.zip_encoder`)
COND_VAE_KIND = "cond_vae"  # a conditional-embedding VAE (`pipeline.training.cond_vae`)
NULL_TEXT_VAE_KIND = "null_text_vae"  # a dataset-wide null-text VAE (`pipeline.training.null_text_vae`)


class ArtefactError(ValueError):
    """An artefact that is missing, unfinished, of another kind or format, or for another base model."""


@dataclass(frozen=True)
class Artefact:
    """A loaded artefact.

    Attributes:
        uri: where it was read from.
        kind: what was trained (e.g. "diffusion_clip").
        version: sha256 of its weights file.
        base_model_fingerprint: `DiffusionModel.fingerprint` of the model it was trained on.
        config: the training config it was trained with.
        metrics: its training metrics.
        weights: the tensors, on the CPU.
    """

    uri: str
    kind: str
    version: str
    base_model_fingerprint: str
    config: dict[str, Any]
    metrics: dict[str, Any]
    weights: dict[str, torch.Tensor]


def write_artefact(
    uri: str,
    kind: str,
    weights: dict[str, torch.Tensor],
    config: dict[str, Any],
    metrics: dict[str, Any],
    base_model_fingerprint: str,
) -> str:
    """Write an artefact folder at `uri` (weights first, the JSON last); returns its version.

    Args:
        uri: the folder, a local path or an fsspec URI.
        kind: what was trained.
        weights: name -> tensor.
        config: JSON-serialisable training config.
        metrics: JSON-serialisable metrics.
        base_model_fingerprint: the base model's fingerprint.
    """
    from safetensors.torch import save as save_safetensors

    fs, root = fsspec.core.url_to_fs(uri)
    data = save_safetensors({name: tensor.detach().cpu().contiguous() for name, tensor in weights.items()})
    version = hashlib.sha256(data).hexdigest()
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "version": version,
        "base_model_fingerprint": base_model_fingerprint,
        "config": config,
        "metrics": metrics,
    }
    write_bytes(fs, f"{root}/{WEIGHTS_NAME}", data)
    write_bytes(fs, f"{root}/{MANIFEST_NAME}", json.dumps(manifest, indent=2, sort_keys=True).encode())
    return version


def read_manifest(uri: str) -> dict[str, Any]:
    """The artefact's JSON, checked for format and version.

    Raises:
        ArtefactError: no artefact at `uri`, or one of an unknown format version.
    """
    fs, root = fsspec.core.url_to_fs(uri)
    path = f"{root}/{MANIFEST_NAME}"
    if not fs.exists(path):
        raise ArtefactError(
            f"no trained artefact at {uri!r} ({MANIFEST_NAME} is missing); train one with `inversa train SPEC.yaml`"
        )
    try:
        manifest = json.loads(fs.cat_file(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ArtefactError(
            f"artefact {uri!r}: {MANIFEST_NAME} is not valid JSON ({error}); it was modified or partly "
            "written: train it again"
        ) from None
    if not isinstance(manifest, dict):
        raise ArtefactError(f"artefact {uri!r}: {MANIFEST_NAME} is not a JSON object; train it again")
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ArtefactError(
            f"artefact {uri!r} has format {manifest.get('format')!r} version {manifest.get('format_version')!r}; "
            f"this inversa reads {FORMAT!r} version {FORMAT_VERSION}"
        )
    return manifest


def read_artefact(uri: str, kind: str | None = None) -> Artefact:
    """Load an artefact, checking its kind and that its weights are the ones its version names.

    Args:
        uri: the folder.
        kind: the expected kind, or None for any.

    Raises:
        ArtefactError: missing, unknown format, another kind, or weights that do not match the version.
    """
    from safetensors.torch import load as load_safetensors

    manifest = read_manifest(uri)
    if kind is not None and manifest["kind"] != kind:
        raise ArtefactError(f"artefact {uri!r} is a {manifest['kind']!r} artefact, not {kind!r}")
    data = verified_weights(uri, manifest)
    return Artefact(
        uri=uri,
        kind=manifest["kind"],
        version=manifest["version"],
        base_model_fingerprint=manifest["base_model_fingerprint"],
        config=manifest["config"],
        metrics=manifest["metrics"],
        weights=load_safetensors(data),
    )


def verified_weights(uri: str, manifest: dict[str, Any]) -> bytes:
    """The bytes of the artefact's weights file, checked against the version its manifest names.

    Raises:
        ArtefactError: the weights file is missing, or its sha256 is not the manifest's version.
    """
    fs, root = fsspec.core.url_to_fs(uri)
    path = f"{root}/{WEIGHTS_NAME}"
    if not fs.exists(path):
        raise ArtefactError(f"artefact {uri!r}: {WEIGHTS_NAME} is missing; train it again")
    data = fs.cat_file(path)
    if hashlib.sha256(data).hexdigest() != manifest["version"]:
        raise ArtefactError(
            f"artefact {uri!r}: {WEIGHTS_NAME} does not match its version {manifest['version'][:12]}; "
            "it was modified or partly written: train it again"
        )
    return data


def check_base_model(manifest: dict[str, Any], uri: str, fingerprint: str, model_id: str) -> None:
    """Refuse an artefact trained on another base model.

    Args:
        manifest: the artefact's JSON (`read_manifest`).
        uri: where it lives, for the message.
        fingerprint: the fingerprint of the model it is about to be used with.
        model_id: that model's path or hub id, for the message.

    Raises:
        ArtefactError: the fingerprints differ.
    """
    trained_on = manifest["base_model_fingerprint"]
    if trained_on != fingerprint:
        raise ArtefactError(
            f"artefact {uri!r} was trained on base model {trained_on[:12]}, but the job's model "
            f"{model_id!r} is {fingerprint[:12]}; train it again on this model or use the model it was trained on"
        )
