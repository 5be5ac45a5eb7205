"""An inversion kept as an artifact: one image's inversion as safetensors bytes, and back.

A job with `inversion.keep_artifacts: true` stores every successful inversion (one per image, or one
per image and target prompt with `inversion.prompt: target`), so the image can be edited again later
with new prompts without inverting it again:

    from pipeline.inversion_state import read_inversions
    inversion = read_inversions(model, ["OUT/artifacts/<shard>/<id>-0.safetensors"])
    results = engine.edit(model, inversion, [EditRequest(0, "a red star on a gray background")])

What one file holds (tensors of the one image, float32):
    trajectory          (S+1, C, h, w) z*_0 .. z*_T of the inversion
    uncond_embeddings   (S, L, D) per sampling step (null-text's optimised null_t)
    cond_embeddings     (S, L, D) per sampling step (prompt tuning's c_t)
    value_embeddings    (S, L, D) when the method feeds the values apart (StyleDiffusion's c~_t)
    reconstruction      (C, h, w) z~_0, and reconstruction_image (H, W, 3) uint8, its decoding
    kept.<name>         what else the method learned for the image (StyleDiffusion's mapping
                        networks M_t: kept.mapping.<step>.<parameter>)
and as metadata: the format version, the inversion config (method and parameters), the prompt it was
inverted with, the model fingerprint, the edit hook's class and the DDIM timesteps.

Restoring checks that the model is the one the inversion was made with (its fingerprint) and rebuilds
the method's edit hook from its parameters (`edit_hook(params, num_steps)` in the method's module;
the default P2P hook when the module has none). A method whose edits need more state than the file
holds (null_text_vae's VAE) is refused with a message naming it.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Sequence

import fsspec
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from pipeline.diffusion.ddim import DDIMSchedule
from pipeline.diffusion.trajectory import EditHook, MethodResult
from pipeline.engine import InversionResult
from pipeline.methods import InversionConfig, get_method
from pipeline.models.loading import DiffusionModel

FORMAT = "inversa-inversion/1"
KEPT_PREFIX = "kept."


class InversionStateError(ValueError):
    """A stored inversion that cannot be restored: the message names the file's problem and the fix."""


def _engine_config(config: InversionConfig) -> InversionConfig:
    """The engine's part of a (job) inversion config: what determines the inversion's tensors."""
    return InversionConfig(
        method=config.method,
        num_steps=config.num_steps,
        guidance_scale=config.guidance_scale,
        strength=config.resolved_strength,
        encoder_fit_steps=config.encoder_fit_steps,
        params=config.method_params,
    )


def inversion_to_bytes(inversion: InversionResult, index: int, model_fingerprint: str) -> bytes:
    """Image `index` of an inverted batch as safetensors bytes (see the module docstring).

    Args:
        inversion: the engine's result for a batch.
        index: the image in the batch; its inversion must have succeeded.
        model_fingerprint: the fingerprint of the model it was inverted with.

    Raises:
        ValueError: the image's inversion failed (there is nothing to keep).
    """
    if inversion.errors[index] is not None:
        raise ValueError(f"image {index}'s inversion failed ({inversion.errors[index]}); nothing to keep")
    latents = inversion.latents
    tensors = {
        "trajectory": latents.trajectory[:, index],
        "uncond_embeddings": latents.uncond_embeddings[:, index],
        "cond_embeddings": latents.cond_embeddings[:, index],
        "reconstruction_image": inversion.reconstructions[index],
    }
    if latents.reconstruction is not None:
        tensors["reconstruction"] = latents.reconstruction[index]
    if latents.value_embeddings is not None:
        tensors["value_embeddings"] = latents.value_embeddings[:, index]
    for name, tensor in latents.kept.items():
        tensors[KEPT_PREFIX + name] = tensor[index]
    tensors = {name: _storable(tensor) for name, tensor in tensors.items()}
    config = _engine_config(inversion.config)
    metadata = {
        "format": FORMAT,
        "config": json.dumps(config.to_mapping(), sort_keys=True),
        "prompt": inversion.source_prompts[index],
        "model_fingerprint": model_fingerprint,
        "edit_hook": type(latents.edit_hook).__qualname__,
        "timesteps": json.dumps(inversion.schedule.timesteps.tolist()),
    }
    return save_safetensors(tensors, metadata=metadata)


def _storable(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy; floating tensors in float32 (the precision inversions optimise in)."""
    tensor = tensor.detach().to("cpu")
    if tensor.is_floating_point():
        tensor = tensor.float()
    return tensor.contiguous().clone()


def _metadata(data: bytes, where: str) -> dict[str, str]:
    """The safetensors header's metadata, checked to be an inversion of this format."""
    try:
        size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + size])
    except (ValueError, UnicodeDecodeError) as error:
        raise InversionStateError(
            f"{where} is not a safetensors file ({error}); pass a kept inversion"
        ) from None
    metadata = header.get("__metadata__") or {}
    if metadata.get("format") != FORMAT:
        raise InversionStateError(
            f"{where} is not a stored inversion of format {FORMAT!r} (found {metadata.get('format')!r}); "
            "pass a file written by a job with inversion.keep_artifacts: true"
        )
    return metadata


def _config(metadata: dict[str, str]) -> InversionConfig:
    mapping = json.loads(metadata["config"])
    settings = {key: _tuples(value) for key, value in mapping.items() if key != "method"}
    return InversionConfig.of(mapping["method"], **settings)


def _tuples(value):
    """JSON lists back to the tuples the parameter dataclasses hold."""
    return tuple(_tuples(item) for item in value) if isinstance(value, list) else value


def _edit_hook(config: InversionConfig, stored_hook: str, where: str) -> EditHook:
    module = importlib.import_module(get_method(config.method).module)
    build = getattr(module, "edit_hook", None)
    hook = build(config.method_params, config.num_steps) if build is not None else EditHook()
    if type(hook).__qualname__ != stored_hook:
        raise InversionStateError(
            f"{where}: method {config.method!r} edits through {stored_hook}, whose state is not stored "
            "with the inversion, so it cannot be edited again from the file; invert the image again"
        )
    return hook


def inversion_from_bytes(
    model: DiffusionModel, blobs: Sequence[bytes], names: Sequence[str] | None = None
) -> InversionResult:
    """Stored inversions back into one batch the engine can edit (`engine.edit`).

    Args:
        model: the model the inversions were made with (checked by fingerprint).
        blobs: one stored inversion per image of the batch, all with the same inversion config.
        names: where each blob came from, for messages (default: "inversion <i>").

    Returns:
        An InversionResult of len(blobs) images, in order; `seconds` is 0 (nothing was inverted).

    Raises:
        InversionStateError: not a stored inversion, another model, configs that differ, or a method
            whose edit state is not stored.
    """
    names = list(names) if names is not None else [f"inversion {i}" for i in range(len(blobs))]
    if not blobs:
        raise InversionStateError("no stored inversions given; pass at least one file")
    metadatas = [_metadata(data, where) for data, where in zip(blobs, names, strict=True)]
    for metadata, where in zip(metadatas, names, strict=True):
        if metadata["model_fingerprint"] != model.fingerprint:
            raise InversionStateError(
                f"{where} was inverted with model fingerprint {metadata['model_fingerprint'][:12]}…, not "
                f"{model.model_id} ({model.fingerprint[:12]}…); load the model it was made with"
            )
        if metadata["config"] != metadatas[0]["config"]:
            raise InversionStateError(
                f"{where} was inverted with {metadata['config']}, {names[0]} with {metadatas[0]['config']}; "
                "restore inversions of one config per batch"
            )
    config = _config(metadatas[0])
    hook = _edit_hook(config, metadatas[0]["edit_hook"], names[0])
    schedule = DDIMSchedule.from_scheduler(model.scheduler, config.num_steps, config.resolved_strength)
    if json.dumps(schedule.timesteps.tolist()) != metadatas[0]["timesteps"]:
        raise InversionStateError(
            f"{names[0]} was inverted on timesteps {metadatas[0]['timesteps']}, but the model's scheduler "
            f"gives {schedule.timesteps.tolist()}; load the model (and scheduler config) it was made with"
        )
    states = [load_safetensors(data) for data in blobs]
    return InversionResult(
        config=config,
        schedule=schedule,
        source_prompts=[metadata["prompt"] for metadata in metadatas],
        latents=_method_result(states, hook, model.device),
        reconstructions=torch.stack([state["reconstruction_image"] for state in states]).to(model.device),
        errors=[None] * len(states),
        seconds=0.0,
    )


def _method_result(
    states: list[dict[str, torch.Tensor]], hook: EditHook, device: torch.device
) -> MethodResult:
    def stacked(name: str, dim: int) -> torch.Tensor | None:
        if name not in states[0]:
            return None
        return torch.stack([state[name] for state in states], dim=dim).to(device)

    kept_names = [name for name in states[0] if name.startswith(KEPT_PREFIX)]
    return MethodResult(
        trajectory=stacked("trajectory", 1),
        uncond_embeddings=stacked("uncond_embeddings", 1),
        cond_embeddings=stacked("cond_embeddings", 1),
        reconstruction=stacked("reconstruction", 0),
        errors=[None] * len(states),
        edit_hook=hook,
        value_embeddings=stacked("value_embeddings", 1),
        kept={name[len(KEPT_PREFIX) :]: stacked(name, 0) for name in kept_names},
    )


def read_inversions(model: DiffusionModel, uris: Sequence[str]) -> InversionResult:
    """`inversion_from_bytes` of files (local paths or any fsspec URL, e.g. s3://...).

    Args:
        model: the model the inversions were made with.
        uris: the stored inversions, one per image of the returned batch.
    """
    blobs = []
    for uri in uris:
        try:
            with fsspec.open(uri, "rb") as handle:
                blobs.append(handle.read())
        except FileNotFoundError:
            raise InversionStateError(f"stored inversion {uri} does not exist; check the path") from None
    return inversion_from_bytes(model, blobs, list(uris))


__all__ = [
    "InversionStateError",
    "inversion_from_bytes",
    "inversion_to_bytes",
    "read_inversions",
]
