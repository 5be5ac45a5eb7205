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


def write_perturbed_editor(
    model, uri: str, seed: int, fingerprint: str | None = None, config: dict | None = None
) -> str:
    """Write a full-weight editor whose UNet is `model`'s plus seeded noise; returns its version.

    Args:
        model: the base DiffusionModel.
        uri: the artefact folder.
        seed: seeds the perturbation (different seeds, different editors).
        fingerprint: the base model fingerprint recorded (default: the model's own).
        config: training-config entries added to the minimal one (e.g. its `data`).
    """
    generator = torch.Generator().manual_seed(seed)
    weights = {
        name: tensor + 0.05 * torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
        for name, tensor in model.unet.state_dict().items()
    }
    config = {**EDITOR_CONFIG, **(config or {})}
    return write_artefact(uri, KIND, weights, config, {}, fingerprint or model.fingerprint)


def write_random_zip_encoder(model, uri: str, seed: int) -> str:
    """Write a ZIP encoder artefact whose head has a seeded random (non-zero) output layer and two
    reference images (black and white), in the format `inversa train` writes; returns its version."""
    from pipeline.methods.zip_attribute import AttributeHead
    from pipeline.training.zip_encoder import (
        HEAD_PREFIX,
        REFERENCES_NAME,
        mid_block_channels,
    )
    from pipeline.training.zip_encoder import (
        KIND as ZIP_KIND,
    )

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = AttributeHead(mid_block_channels(model.unet), hidden=8)
    last = head.layers[-1]
    last.weight.data = 0.5 * torch.randn(last.weight.shape, generator=generator)
    head.layers[0].weight.data[:, head.channels :] *= 50.0  # the reference code weighs as much as h
    weights = {f"{HEAD_PREFIX}{name}": tensor for name, tensor in head.state_dict().items()}
    size = model.image_size
    # Two references far apart (black and white), so that which one steers an edit shows.
    weights[REFERENCES_NAME] = torch.stack(
        [torch.zeros(size, size, 3, dtype=torch.uint8), torch.full((size, size, 3), 255, dtype=torch.uint8)]
    )
    config = EDITOR_CONFIG | {"zip_step": 200, "channels": head.channels, "hidden_resolved": head.hidden}
    config["data"] = {"attribute": "shape", "value": "star"}
    return write_artefact(uri, ZIP_KIND, weights, config, {}, model.fingerprint)


def write_random_cond_vae(model, uri: str, seed: int, fingerprint: str | None = None) -> str:
    """Write a conditional-embedding VAE artefact for `model` whose zero-initialised last layer has seeded
    random weights (its samples differ by seed), in the format `inversa train` writes; returns its version."""
    from pipeline.diffusion.tokens import encode_prompts
    from pipeline.methods.cond_vae import ConditionalEmbeddingVAE, VAESizes
    from pipeline.training.cond_vae import KIND as COND_VAE_KIND

    tokens, channels = encode_prompts(model.tokenizer, model.text_encoder, [""]).shape[1:]
    sizes = VAESizes(latent_dim=4, reduced_channels=2, hidden_dim=8)
    generator = torch.Generator().manual_seed(seed)
    vae = ConditionalEmbeddingVAE(tokens, channels, sizes, generator)
    with torch.no_grad():
        vae.expand_weight.copy_(torch.randn(vae.expand_weight.shape, generator=generator))
        vae.logvar_bias.fill_(2.0)
    weights = {name: tensor.detach().clone() for name, tensor in vae.state_dict().items()}
    config = {"latent_dim": 4, "reduced_channels": 2, "hidden_dim": 8, "tokens": tokens, "channels": channels}
    return write_artefact(uri, COND_VAE_KIND, weights, config, {}, fingerprint or model.fingerprint)


def write_random_null_text_vae(
    model, uri: str, seed: int, settings: dict | None = None, fingerprint: str | None = None
) -> str:
    """Write a dataset-wide null-text VAE artefact for `model` (seeded random last layer) in the format
    `inversa train` writes, trained (as its config says) with `settings` (NullTextVAEConfig fields, e.g.
    steps); returns its version."""
    import dataclasses

    from pipeline.methods.null_text_vae import EmbeddingVAE
    from pipeline.training.null_text_vae import KIND as NULL_TEXT_VAE_KIND
    from pipeline.training.null_text_vae import NullTextVAEConfig

    config = NullTextVAEConfig(latent_dim=4, reduced_channels=2, hidden_dim=8, **(settings or {}))
    tokens = model.text_encoder.config.max_position_embeddings
    channels = model.text_encoder.config.hidden_size
    generator = torch.Generator().manual_seed(seed)
    base = torch.zeros(1, tokens, channels)
    vae = EmbeddingVAE(1, tokens, channels, config, base, generator, add_input=True)
    with torch.no_grad():
        vae.expand_weight.copy_(torch.randn(vae.expand_weight.shape, generator=generator))
    weights = {name: tensor.detach().clone() for name, tensor in vae.state_dict().items()}
    recorded = dataclasses.asdict(config) | {"tokens": tokens, "channels": channels}
    return write_artefact(uri, NULL_TEXT_VAE_KIND, weights, recorded, {}, fingerprint or model.fingerprint)
