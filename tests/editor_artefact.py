"""A DiffusionCLIP editor artefact for tests, written without training: the base UNet's weights with a
seeded perturbation, in the artefact format `inversa train` writes."""

from __future__ import annotations

import torch

from pipeline.training.artefact import write_artefact
from pipeline.training.diffusion_clip import KIND

EDITOR_CONFIG = {
    "adapter_resolved": "full",
    "return_step": 400,
    "inference_forward_steps": 3,
    "inference_generative_steps": 2,
    "prompt": "",
}


def write_perturbed_editor(model, uri: str, seed: int, fingerprint: str | None = None) -> str:
    """Write a full-weight editor whose UNet is `model`'s plus seeded noise; returns its version.

    Args:
        model: the base DiffusionModel.
        uri: the artefact folder.
        seed: seeds the perturbation (different seeds, different editors).
        fingerprint: the base model fingerprint recorded (default: the model's own).
    """
    generator = torch.Generator().manual_seed(seed)
    weights = {
        name: tensor + 0.05 * torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
        for name, tensor in model.unet.state_dict().items()
    }
    return write_artefact(uri, KIND, weights, EDITOR_CONFIG, {}, fingerprint or model.fingerprint)
