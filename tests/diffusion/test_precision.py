"""The precision policies: which UNet calls are lowered, and how far results move from fp32's.

CPU autocast runs the same bf16 arithmetic as CUDA's, so the tolerances measured here bound the
mixed policy's effect on the tiny model; `benchmarks/throughput.py` measures it at SD scale on a GPU.
"""

import dataclasses

import pytest
import torch

from pipeline.diffusion import precision
from pipeline.engine import AttentionControl, EditRequest, InversionConfig, edit, invert

STEPS = 5


class DtypeRecorder:
    """Records the dtype of the first convolution's output, with whether grad mode was on."""

    def __init__(self, unet):
        self.calls: list[tuple[torch.dtype, bool]] = []
        self.handle = unet.conv_in.register_forward_hook(self._record)

    def _record(self, module, inputs, output):
        del module, inputs
        self.calls.append((output.dtype, torch.is_grad_enabled()))

    def close(self):
        self.handle.remove()


@pytest.fixture()
def recorder(tiny_sd):
    recorder = DtypeRecorder(tiny_sd.unet)
    yield recorder
    recorder.close()


def _inputs(tiny_sd, batch=2):
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(batch, 4, 8, 8, generator=generator)
    embeddings = torch.randn(batch, 77, tiny_sd.unet.config.cross_attention_dim, generator=generator)
    return latents, embeddings


@pytest.mark.parametrize("policy", ["fp32", "tf32"])
def test_full_precision_policies_run_the_fixed_branch_in_float32(tiny_sd, recorder, policy):
    latents, embeddings = _inputs(tiny_sd)
    with precision.using(policy), torch.no_grad():
        noise = precision.fixed_branch_noise(tiny_sd.unet, latents, 500, embeddings)
    assert recorder.calls == [(torch.float32, False)]
    assert noise.dtype == torch.float32


def test_mixed_lowers_a_no_grad_call_to_bf16_and_returns_float32(tiny_sd, recorder):
    latents, embeddings = _inputs(tiny_sd)
    with torch.no_grad():
        reference = precision.fixed_branch_noise(tiny_sd.unet, latents, 500, embeddings)
        with precision.using("mixed"):
            lowered = precision.fixed_branch_noise(tiny_sd.unet, latents, 500, embeddings)
    assert [dtype for dtype, _ in recorder.calls] == [torch.float32, torch.bfloat16]
    assert lowered.dtype == torch.float32
    relative = (lowered - reference).norm() / reference.norm()
    # bf16 keeps 8 mantissa bits: a UNet pass lands near 1e-2, never exactly on fp32's result.
    assert 0 < relative < 5e-2


def test_mixed_never_lowers_a_call_that_records_gradients(tiny_sd, recorder):
    latents, embeddings = _inputs(tiny_sd)
    embeddings.requires_grad_(True)
    with precision.using("mixed"):
        noise = precision.fixed_branch_noise(tiny_sd.unet, latents, 500, embeddings)
    assert recorder.calls == [(torch.float32, True)]
    assert noise.requires_grad


def test_bf16_lowers_the_optimised_branch_and_gradients_reach_float32_embeddings(tiny_sd, recorder):
    latents, embeddings = _inputs(tiny_sd)
    embeddings.requires_grad_(True)
    with precision.using("bf16"):
        noise = precision.optimised_branch_noise(tiny_sd.unet, latents, 500, embeddings)
    noise.pow(2).mean().backward()
    assert recorder.calls == [(torch.bfloat16, True)]
    assert noise.dtype == torch.float32
    assert embeddings.grad.dtype == torch.float32 and embeddings.grad.abs().sum() > 0


@pytest.mark.parametrize("policy", ["fp32", "tf32", "mixed"])
def test_only_bf16_lowers_the_optimised_branch(tiny_sd, recorder, policy):
    latents, embeddings = _inputs(tiny_sd)
    embeddings.requires_grad_(True)
    with precision.using(policy):
        precision.optimised_branch_noise(tiny_sd.unet, latents, 500, embeddings)
    assert recorder.calls == [(torch.float32, True)]


@pytest.fixture()
def float16_autocast_default():
    """CPU autocast with CUDA's default dtype (float16), restored after the test."""
    saved = torch.get_autocast_dtype("cpu")
    torch.set_autocast_dtype("cpu", torch.float16)
    yield
    torch.set_autocast_dtype("cpu", saved)


def test_lowered_calls_ask_for_bf16_by_name_not_autocasts_default(
    tiny_sd, recorder, float16_autocast_default
):
    # On CUDA autocast lowers to float16 unless told otherwise; bf16's wider exponent is the point.
    latents, embeddings = _inputs(tiny_sd)
    with precision.using("mixed"), torch.no_grad():
        precision.fixed_branch_noise(tiny_sd.unet, latents, 500, embeddings)
    with precision.using("bf16"):
        precision.optimised_branch_noise(tiny_sd.unet, latents, 500, embeddings.requires_grad_(True))
    assert torch.get_autocast_dtype("cpu") == torch.float16  # the default really was float16
    assert [dtype for dtype, _ in recorder.calls] == [torch.bfloat16, torch.bfloat16]


def test_using_restores_the_policy_and_tf32_switches():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with precision.using("tf32"):
            assert precision.current() == "tf32"
            assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
            with precision.using("fp32"):
                assert not torch.backends.cuda.matmul.allow_tf32
                assert not torch.backends.cudnn.allow_tf32
            assert torch.backends.cuda.matmul.allow_tf32
        assert precision.current() == "fp32"
        assert not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_an_unknown_policy_is_refused_by_name():
    with (
        pytest.raises(ValueError, match="'fp16' is not one of fp32, tf32, mixed, bf16"),
        precision.using("fp16"),
    ):
        pass


@pytest.fixture(scope="module")
def mixed_model(tiny_sd):
    return dataclasses.replace(tiny_sd, precision="mixed")


@pytest.mark.parametrize("method", ["null_text", "prompt_tuning"])
def test_mixed_optimises_in_float32_and_lowers_only_the_fixed_branches(
    tiny_sd, mixed_model, images, prompts, recorder, method
):
    settings = {"early_stop_epsilon": -1.0} if method == "null_text" else {}
    config = InversionConfig.of(method, num_steps=STEPS, inner_steps=2, **settings)
    invert(mixed_model, images[:2], prompts[:2], config)
    with_grad = {dtype for dtype, grad in recorder.calls if grad}
    without_grad = {dtype for dtype, grad in recorder.calls if not grad}
    assert with_grad == {torch.float32}
    assert without_grad == {torch.bfloat16}


def test_bf16_runs_every_unet_call_of_null_text_in_bf16(tiny_sd, images, prompts, recorder):
    model = dataclasses.replace(tiny_sd, precision="bf16")
    config = InversionConfig.of("null_text", num_steps=STEPS, inner_steps=2, early_stop_epsilon=-1.0)
    invert(model, images[:2], prompts[:2], config)
    assert {grad for _, grad in recorder.calls} == {True, False}
    assert {dtype for dtype, _ in recorder.calls} == {torch.bfloat16}


def _latent_error(result, reference) -> float:
    return float((result - reference).norm() / reference.norm())


@pytest.mark.parametrize(
    "method, policy",
    [("ddim", "mixed"), ("null_text", "mixed"), ("direct", "mixed"), ("null_text", "bf16")],
)
def test_lowered_reconstructions_stay_within_tolerance_of_fp32(tiny_sd, images, prompts, method, policy):
    config = InversionConfig.of(method, num_steps=STEPS, guidance_scale=7.5)
    full = invert(tiny_sd, images[:2], prompts[:2], config)
    mixed = invert(dataclasses.replace(tiny_sd, precision=policy), images[:2], prompts[:2], config)
    # z_T comes from bf16 inversion steps: close to fp32's, never equal.
    assert 0 < _latent_error(mixed.latents.trajectory[-1], full.latents.trajectory[-1]) < 2e-2
    assert _latent_error(mixed.latents.reconstruction, full.latents.reconstruction) < 2e-2
    pixels = (mixed.reconstructions.float() - full.reconstructions.float()).abs()
    assert pixels.mean() < 2.0  # of 255


def test_edit_runs_under_the_models_policy(mixed_model, images, prompts, recorder):
    config = InversionConfig.of("ddim", num_steps=STEPS)
    inversion = invert(mixed_model, images[:1], prompts[:1], config)
    recorder.calls.clear()
    edit(mixed_model, inversion, [EditRequest(0, "a red square on a white background", AttentionControl())])
    assert recorder.calls and {dtype for dtype, _ in recorder.calls} == {torch.bfloat16}


def test_mixed_p2p_edits_stay_within_tolerance_of_fp32(tiny_sd, mixed_model, images, prompts):
    config = InversionConfig.of("null_text", num_steps=STEPS, guidance_scale=7.5, inner_steps=2)
    controls = [
        AttentionControl("replace", blend_words=("circle", "square")),
        AttentionControl("none", reweight=(("red", 2.0),)),
        AttentionControl("replace", unconditional_self_replace_steps=0.5),
    ]
    requests = [EditRequest(0, "a red square on a white background", control) for control in controls]
    results = {}
    for name, model in (("fp32", tiny_sd), ("mixed", mixed_model)):
        inversion = invert(model, images[:1], prompts[:1], config)
        results[name] = edit(model, inversion, requests)
    for full, mixed in zip(results["fp32"], results["mixed"], strict=True):
        assert full.error is None and mixed.error is None
        assert (mixed.image.float() - full.image.float()).abs().mean() < 2.0
