import pytest
import torch

from pipeline.engine import AttentionControl, EditRequest, EngineInputError, InversionConfig, edit, invert

CONFIG = InversionConfig.of(method="ddim", num_steps=2, guidance_scale=1.0)


@pytest.mark.parametrize(
    ("images", "match"),
    [
        (torch.zeros(1, 32, 32, 4, dtype=torch.uint8), r"\(B, 32, 32, 3\)"),
        (torch.zeros(1, 16, 16, 3, dtype=torch.uint8), "resize/crop to 32x32"),
        (torch.zeros(1, 32, 32, 3), "torch.uint8"),
    ],
)
def test_images_must_be_rgb_uint8_at_model_size(tiny_sd, images, match):
    with pytest.raises(EngineInputError, match=match):
        invert(tiny_sd, images, ["a red circle"], CONFIG)


def test_prompt_errors_name_the_argument(tiny_sd, images):
    with pytest.raises(EngineInputError, match=r"source_prompts\[1\] is empty"):
        invert(tiny_sd, images[:2], ["a red circle", "  "], CONFIG)
    with pytest.raises(EngineInputError, match=r"source_prompts\[0\].*limit is 77"):
        invert(tiny_sd, images[:1], ["red " * 80], CONFIG)
    with pytest.raises(EngineInputError, match="one prompt per image"):
        invert(tiny_sd, images[:2], ["a red circle"], CONFIG)
    with pytest.raises(EngineInputError, match="inversion.method 'magic'"):
        invert(tiny_sd, images[:1], ["a red circle"], InversionConfig(method="magic"))


@pytest.fixture(scope="module")
def ddim_inversion(tiny_sd, images):
    return invert(tiny_sd, images[:1], ["a red circle on a white background"], CONFIG)


@pytest.mark.parametrize(
    ("request_", "match"),
    [
        (EditRequest(3, "a blue circle"), r"image_index=3 is outside"),
        (EditRequest(0, ""), "target_prompt is empty"),
        (EditRequest(0, "a red big circle on a white background"), "equal word count"),
        (
            EditRequest(0, "a red square on a white background", AttentionControl(reweight=(("blue", 2.0),))),
            "'blue'",
        ),
        (
            EditRequest(0, "a red square on a white background", AttentionControl(blend_words=("tree",))),
            "'tree'",
        ),
        (EditRequest(0, "a red square on a white background", eta=1.5), "eta=1.5"),
    ],
)
def test_edit_request_errors(tiny_sd, ddim_inversion, request_, match):
    with pytest.raises(EngineInputError, match=match):
        edit(tiny_sd, ddim_inversion, [request_])


def test_nan_in_one_image_is_a_per_image_error_naming_image_and_step(tiny_sd, images, prompts):
    """A NaN injected into image 1's noise prediction at one step fails image 1 only."""
    poisoned_timestep = 501

    def poison(module, args, kwargs, output):
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        if int(timestep) == poisoned_timestep and output.sample.shape[0] > 1:
            output.sample[1] = float("nan")
        return output

    handle = tiny_sd.unet.register_forward_hook(poison, with_kwargs=True)
    try:
        result = invert(
            tiny_sd,
            images[:2],
            prompts[:2],
            InversionConfig.of(method="ddim", num_steps=2, guidance_scale=1.0),
        )
    finally:
        handle.remove()
    assert result.errors[0] is None
    assert "image 1" in result.errors[1] and "timestep 501" in result.errors[1]
    edits = edit(tiny_sd, result, [EditRequest(0, prompts[0]), EditRequest(1, prompts[1])])
    assert edits[0].error is None and edits[0].image.shape == (32, 32, 3)
    assert edits[1].image is None and "inversion failed" in edits[1].error


def test_encoder_fit_steps_invert_the_fitted_latent(tiny_sd, images, prompts):
    """The trajectory starts at the latent the decoder fit gives, not the encoder's."""
    from pipeline.models.vae import encode_images

    config = InversionConfig.of(method="ddim", num_steps=2, guidance_scale=1.0, encoder_fit_steps=5)
    result = invert(tiny_sd, images[:2], prompts[:2], config)
    fitted = encode_images(tiny_sd, images[:2], fit_steps=5)
    torch.testing.assert_close(result.latents.trajectory[0], fitted)
    assert not torch.allclose(fitted, encode_images(tiny_sd, images[:2]))


def test_encoder_fit_steps_need_a_float32_vae_and_a_count(tiny_sd, images, prompts):
    import copy
    import dataclasses

    half = dataclasses.replace(tiny_sd, vae=copy.deepcopy(tiny_sd.vae).half())
    config = InversionConfig.of(method="ddim", num_steps=2, guidance_scale=1.0, encoder_fit_steps=5)
    with pytest.raises(EngineInputError, match="encoder_fit_steps 5 .* needs a float32 VAE"):
        invert(half, images[:1], prompts[:1], config)
    with pytest.raises(ValueError, match="encoder_fit_steps must be >= 0"):
        InversionConfig.of(method="ddim", encoder_fit_steps=-1)
