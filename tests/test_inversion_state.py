"""A stored inversion restores to one the engine edits exactly as the in-memory one."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline.engine import AttentionControl, EditRequest, InversionConfig, edit, invert
from pipeline.inversion_state import (
    InversionStateError,
    inversion_from_bytes,
    inversion_to_bytes,
    read_inversions,
)
from pipeline.methods.style_diffusion import map_tokens
from pipeline.metrics.clip import ClipScorer
from pipeline.world.clip_model import SHAPES_CLIP_NAME, SHAPES_CLIP_WEIGHTS, register_shapes_clip

SETTINGS = {"num_steps": 3, "guidance_scale": 7.5}
CONFIGS = {
    "ddim": InversionConfig.of("ddim", **SETTINGS),
    "ddim_encoder_fit": InversionConfig.of("ddim", encoder_fit_steps=3, **SETTINGS),
    "null_text": InversionConfig.of("null_text", inner_steps=2, **SETTINGS),
    "prompt_tuning": InversionConfig.of("prompt_tuning", inner_steps=2, **SETTINGS),
    "direct": InversionConfig.of("direct", **SETTINGS),
    "style_diffusion": InversionConfig.of(
        "style_diffusion", inner_steps=2, learning_rate=1e-3, value_steps=0.7, **SETTINGS
    ),
}


@pytest.fixture(scope="module")
def image_encoder():
    register_shapes_clip()
    return ClipScorer(SHAPES_CLIP_NAME, str(SHAPES_CLIP_WEIGHTS)).image_tokens


def _requests() -> list[EditRequest]:
    swap = AttentionControl(cross_replace_steps=0.6, self_replace_steps=0.4)
    return [
        EditRequest(0, "a red square on a white background", swap, eta=0.7),
        EditRequest(1, "a blue circle on a gray background", AttentionControl(), eta=0.7),
        EditRequest(1, "a green square on a gray background", swap, latent_interpolation=True, eta=0.5),
    ]


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_restored_inversion_edits_like_the_original(tiny_sd, images, image_encoder, method):
    prompts = ["a red circle on a white background", "a blue square on a gray background"]
    original = invert(tiny_sd, images[:2], prompts, CONFIGS[method], image_encoder=image_encoder)
    blobs = [inversion_to_bytes(original, index, tiny_sd.fingerprint) for index in range(2)]
    restored = inversion_from_bytes(tiny_sd, blobs)

    assert restored.source_prompts == prompts
    assert restored.config.encoder_fit_steps == CONFIGS[method].encoder_fit_steps
    assert type(restored.latents.edit_hook) is type(original.latents.edit_hook)
    torch.testing.assert_close(restored.schedule.timesteps, original.schedule.timesteps)
    torch.testing.assert_close(restored.reconstructions, original.reconstructions)
    requests = _requests()
    for before, after in zip(
        edit(tiny_sd, original, requests), edit(tiny_sd, restored, requests), strict=True
    ):
        assert before.error is None and after.error is None
        torch.testing.assert_close(after.latents, before.latents, rtol=0, atol=1e-5)


def test_kept_mapping_networks_reproduce_the_value_embeddings(tiny_sd, images, image_encoder):
    prompts = ["a red circle on a white background", "a blue square on a gray background"]
    original = invert(tiny_sd, images[:2], prompts, CONFIGS["style_diffusion"], image_encoder=image_encoder)
    restored = inversion_from_bytes(tiny_sd, [inversion_to_bytes(original, 1, tiny_sd.fingerprint)])

    tokens = image_encoder(images[1:2].permute(0, 3, 1, 2).float() / 255.0)
    kept = restored.latents.kept
    steps = CONFIGS["style_diffusion"].num_steps
    assert {name.split(".")[1] for name in kept} == {str(step) for step in range(steps)}
    for step in range(steps):
        weights = {
            name.split(".")[2]: value for name, value in kept.items() if name.split(".")[1] == str(step)
        }
        values = map_tokens(weights, tokens)  # M_t(E(x)) from the stored network alone
        torch.testing.assert_close(values[0], original.latents.value_embeddings[step, 1], atol=1e-6, rtol=0)


def test_restoring_refuses_another_model_mixed_configs_and_unstored_state(tiny_sd, images):
    prompts = ["a red circle on a white background"]
    ddim = invert(tiny_sd, images[:1], prompts, CONFIGS["ddim"])
    blob = inversion_to_bytes(ddim, 0, tiny_sd.fingerprint)

    other = dataclasses.replace(tiny_sd, fingerprint="f" * 64)
    with pytest.raises(InversionStateError, match="load the model it was made with"):
        inversion_from_bytes(other, [blob])

    longer = invert(tiny_sd, images[:1], prompts, InversionConfig.of("ddim", num_steps=4, guidance_scale=7.5))
    with pytest.raises(InversionStateError, match="one config per batch"):
        inversion_from_bytes(tiny_sd, [blob, inversion_to_bytes(longer, 0, tiny_sd.fingerprint)])

    vae = invert(
        tiny_sd, images[:1], prompts, InversionConfig.of("null_text_vae", inner_steps=1, epochs=1, **SETTINGS)
    )
    with pytest.raises(InversionStateError, match="NullTextVAEEditHook.*invert the image again"):
        inversion_from_bytes(tiny_sd, [inversion_to_bytes(vae, 0, tiny_sd.fingerprint)])

    with pytest.raises(InversionStateError, match="not a safetensors file"):
        inversion_from_bytes(tiny_sd, [b"\x05\x00\x00\x00\x00\x00\x00\x00hello"], ["bad.safetensors"])


def test_read_inversions_names_a_missing_file(tiny_sd, tmp_path):
    with pytest.raises(InversionStateError, match="missing.safetensors does not exist"):
        read_inversions(tiny_sd, [str(tmp_path / "missing.safetensors")])
