"""StyleDiffusion: value-only injection, batching, the paper's training (against a written-out second
implementation), reconstruction, editing through the edit hook, and refused parameters."""

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.diffusion.attention import ControlledAttnProcessor, mask_resolution_for
from pipeline.diffusion.ddim import DDIMSchedule
from pipeline.diffusion.tokens import encode_prompts
from pipeline.diffusion.trajectory import InversionInputs
from pipeline.engine import AttentionControl, EditRequest, EngineInputError, InversionConfig, edit, invert
from pipeline.methods import StyleDiffusionParams
from pipeline.methods.ddim_inversion import ddim_trajectory
from pipeline.methods.style_diffusion import (
    StyleDiffusionEditHook,
    edit_hook,
    init_mapping,
    inner_iterations,
    map_tokens,
    step_loss,
    train_mapping_networks,
)
from pipeline.methods.style_diffusion import _still_active as still_active
from pipeline.methods.style_diffusion import invert as style_diffusion_invert
from pipeline.metrics.clip import ClipScorer
from pipeline.models.vae import encode_images
from pipeline.world.clip_model import SHAPES_CLIP_NAME, SHAPES_CLIP_WEIGHTS, register_shapes_clip

STEPS = 3


@pytest.fixture(scope="module")
def image_encoder():
    """The shapes world's frozen open_clip vision tower: E(x) of (B, 3, H, W) images in [0, 1]."""
    register_shapes_clip()
    return ClipScorer(SHAPES_CLIP_NAME, str(SHAPES_CLIP_WEIGHTS)).image_tokens


def _inputs(model, images, prompts, encoder, steps=STEPS):
    schedule = DDIMSchedule.from_scheduler(model.scheduler, steps)
    return InversionInputs(
        unet=model.unet,
        schedule=schedule,
        clean_latents=encode_images(model, images),
        cond_embeddings=encode_prompts(model.tokenizer, model.text_encoder, prompts),
        uncond_embeddings=encode_prompts(model.tokenizer, model.text_encoder, [""] * len(prompts)),
        guidance_scale=7.5,
        images=images.permute(0, 3, 1, 2).float() / 255.0,
        image_encoder=encoder,
    )


def _ddim_path(inputs: InversionInputs, errors: list) -> torch.Tensor:
    """StyleDiffusion's trajectory: DDIM inversion at w = 1 with the source prompt, (S+1, B, C, h, w)."""
    return ddim_trajectory(
        inputs.unet,
        inputs.schedule,
        inputs.clean_latents,
        inputs.cond_embeddings,
        inputs.uncond_embeddings,
        1.0,
        errors,
    )


class _AllCrossMaps:
    """Records the cross-attention probabilities of every layer, in call order."""

    def __init__(self):
        self.maps = []

    def wants_probs(self, is_cross, num_queries):
        return is_cross

    def __call__(self, probs, is_cross, heads):
        self.maps.append(probs.clone())
        return probs


def _run(unet, latents, encoder_states, value_input):
    recorder = _AllCrossMaps()
    saved = dict(unet.attn_processors)
    unet.set_attn_processor(ControlledAttnProcessor(recorder, value_input=value_input))
    try:
        with torch.no_grad():
            out = unet(latents, 981, encoder_hidden_states=encoder_states).sample
    finally:
        unet.set_attn_processor(saved)
    return out, recorder.maps


def test_value_input_changes_the_output_while_the_keys_keep_the_source_maps(tiny_sd, prompts):
    encode = lambda texts: encode_prompts(tiny_sd.tokenizer, tiny_sd.text_encoder, texts)  # noqa: E731
    source, other = encode(prompts[:1]), encode(prompts[2:3])
    latents = torch.randn(1, tiny_sd.latent_channels, 4, 4, generator=torch.Generator().manual_seed(0))
    plain_out, plain_maps = _run(tiny_sd.unet, latents, source, value_input=False)
    other_out, other_maps = _run(tiny_sd.unet, latents, other, value_input=False)
    same_out, _ = _run(tiny_sd.unet, latents, torch.cat([source, source], 1), value_input=True)
    swapped_out, swapped_maps = _run(tiny_sd.unet, latents, torch.cat([source, other], 1), value_input=True)
    # [c | c] is ordinary attention with c.
    torch.testing.assert_close(same_out, plain_out, atol=1e-5, rtol=0)
    # The value input changes what is drawn...
    assert (swapped_out - plain_out).abs().max() > 1e-3
    # ...while the first cross-attention layer (whose queries no earlier value has touched) attends
    # exactly as with the source prompt's keys, not as with the other prompt's.
    torch.testing.assert_close(swapped_maps[0], plain_maps[0], atol=1e-6, rtol=0)
    assert (other_maps[0] - plain_maps[0]).abs().max() > 1e-4


def test_batched_training_equals_each_image_alone_with_different_early_stops(
    tiny_sd, images, prompts, image_encoder
):
    inputs = _inputs(tiny_sd, images[:3], prompts[:3], image_encoder)
    trajectory = _ddim_path(inputs, [None] * 3)
    probe = StyleDiffusionParams(inner_steps=1, learning_rate=1e-3, early_stop_epsilon=None)
    first = train_mapping_networks(inputs, probe, trajectory, image_encoder(inputs.images), [None] * 3)
    # An epsilon between two images' first losses stops some images after one iteration at step 0.
    epsilon = float(first.losses[0].sort().values[:2].mean())
    # With beta1 > 0 a stopped image that still took part in the forward pass would keep moving by
    # momentum on a zero gradient (with the paper's beta1 = 0 it would not move at all).
    params = StyleDiffusionParams(
        inner_steps=3, learning_rate=1e-3, betas=(0.9, 0.999), early_stop_epsilon=epsilon
    )
    batched = train_mapping_networks(inputs, params, trajectory, image_encoder(inputs.images), [None] * 3)
    for image in range(3):
        alone_inputs = _inputs(tiny_sd, images[image : image + 1], prompts[image : image + 1], image_encoder)
        alone = train_mapping_networks(
            alone_inputs,
            params,
            trajectory[:, image : image + 1],
            image_encoder(alone_inputs.images),
            [None],
        )
        torch.testing.assert_close(batched.values[:, image], alone.values[:, 0], atol=1e-5, rtol=0)
        torch.testing.assert_close(batched.reconstruction[image], alone.reconstruction[0], atol=1e-5, rtol=0)
        assert torch.equal(batched.iterations[:, image], alone.iterations[:, 0])
    assert (batched.iterations[0] == 1).any() and (batched.iterations[0] == 3).any(), batched.iterations


def _mapping_modules(weights: dict[str, torch.Tensor]) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """Table 1 as torch.nn layers: Conv0, Conv1, BatN1, LeakyRelu1, Conv2 (1x1 convs over tokens),
    plus the 1x1 conv over the width when the image width is not the text width."""
    tokens, image_tokens = weights["conv0_weight"].shape
    network = torch.nn.Sequential(
        torch.nn.Conv1d(image_tokens, tokens, 1),
        torch.nn.Conv1d(tokens, tokens, 1),
        torch.nn.BatchNorm1d(tokens),
        torch.nn.LeakyReLU(),
        torch.nn.Conv1d(tokens, tokens, 1),
    ).train()
    width = None
    with torch.no_grad():
        for layer, name in ((network[0], "conv0"), (network[1], "conv1"), (network[4], "conv2")):
            layer.weight.copy_(weights[f"{name}_weight"][..., None])
            layer.bias.copy_(weights[f"{name}_bias"])
        if "width_weight" in weights:
            width = torch.nn.Conv1d(weights["width_weight"].shape[1], weights["width_weight"].shape[0], 1)
            width.weight.copy_(weights["width_weight"][..., None])
            width.bias.copy_(weights["width_bias"])
    return network, width


class _ValueInjection:
    """Value-only injection by hooks on the cross-attention layers' projections: to_v's input is
    replaced by c~; the maps are recomputed from to_q's and to_k's outputs."""

    def __init__(self, unet, queries):
        self.values, self.maps, self.handles = None, [], []
        for name, module in unet.named_modules():
            if name.endswith("attn2"):
                self.handles.append(module.to_v.register_forward_pre_hook(self._replace))
                self.handles.append(module.to_q.register_forward_hook(self._keep("q")))
                self.handles.append(module.to_k.register_forward_hook(self._keep("k", module, queries)))
        self.query = None

    def _replace(self, module, args):
        return (self.values,) if self.values is not None else None

    def _keep(self, what, attention=None, queries=None):
        def hook(module, args, output):
            if what == "q":
                self.query = output
                return
            if self.query.shape[1] != queries:
                return
            heads = attention.heads
            q = self.query.unflatten(-1, (heads, -1)).transpose(1, 2)
            k = output.unflatten(-1, (heads, -1)).transpose(1, 2)
            self.maps.append((q @ k.transpose(-1, -2) * attention.scale).softmax(dim=-1))

        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()


def _reference_style_diffusion(unet, schedule, trajectory, cond, uncond, tokens, guidance, params, weights):
    """Algorithm 1 for one image, written out: torch.nn mapping networks (Table 1), Adam(lr, betas),
    ceil(K e^{-0.1 i}) iterations, loss = MSE(z^_{t-1}, z~_{t-1}) + lambda * sum_layers MSE(a^_t, a~_t)
    with eq. 6's step, M_t warm-started from M_{t+1}."""
    network, width = _mapping_modules(weights)
    modules = torch.nn.ModuleList([m for m in (network, width) if m is not None])
    steps = schedule.num_steps
    latent_size = trajectory.shape[-1]
    injection = _ValueInjection(unet, mask_resolution_for(unet, latent_size) ** 2)

    def mapped():
        hidden = network(tokens)
        return hidden if width is None else width(hidden.transpose(1, 2)).transpose(1, 2)

    def eq6(z, timestep, noise):
        a_t, a_prev = schedule.alpha_bar(timestep), schedule.alpha_bar(timestep - schedule.stride)
        return (a_prev / a_t) ** 0.5 * z + a_prev**0.5 * (
            (1 / a_prev - 1) ** 0.5 - (1 / a_t - 1) ** 0.5
        ) * noise

    z, per_step = trajectory[steps], []
    try:
        for i, timestep in enumerate(schedule.timesteps.tolist()):
            with torch.no_grad():
                injection.values = None
                noise_uncond = unet(z, timestep, encoder_hidden_states=uncond).sample
                injection.maps = []
                unet(trajectory[steps - i], timestep, encoder_hidden_states=cond)
                pivot_maps = injection.maps
            optimizer = torch.optim.Adam(modules.parameters(), lr=params.learning_rate, betas=params.betas)
            for _ in range(math.ceil(params.inner_steps * math.exp(-0.1 * i))):
                injection.values, injection.maps = mapped(), []
                noise_cond = unet(z, timestep, encoder_hidden_states=cond).sample
                landed = eq6(z, timestep, noise_uncond + guidance * (noise_cond - noise_uncond))
                loss = F.mse_loss(landed, trajectory[steps - i - 1]) + params.attention_weight * sum(
                    F.mse_loss(a, b) for a, b in zip(injection.maps, pivot_maps, strict=True)
                )
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            with torch.no_grad():
                injection.values = mapped()
                per_step.append(injection.values)
                noise_cond = unet(z, timestep, encoder_hidden_states=cond).sample
                z = eq6(z, timestep, noise_uncond + guidance * (noise_cond - noise_uncond))
    finally:
        injection.remove()
    return torch.stack(per_step), z


@pytest.mark.parametrize("attention_weight", [0.0, 50.0])
def test_training_follows_algorithm_1_and_eqs_5_to_8(
    tiny_sd, images, prompts, image_encoder, attention_weight
):
    inputs = _inputs(tiny_sd, images[:1], prompts[:1], image_encoder)
    params = StyleDiffusionParams(
        inner_steps=4, learning_rate=1e-3, attention_weight=attention_weight, early_stop_epsilon=None
    )
    trajectory = _ddim_path(inputs, [None])
    tokens = image_encoder(inputs.images)
    ours = train_mapping_networks(inputs, params, trajectory, tokens, [None])
    weights = init_mapping(tokens.shape[1], tokens.shape[2], *inputs.cond_embeddings.shape[1:], params.seed)
    values, reconstruction = _reference_style_diffusion(
        tiny_sd.unet,
        inputs.schedule,
        trajectory,
        inputs.cond_embeddings,
        inputs.uncond_embeddings,
        tokens,
        7.5,
        params,
        copy.deepcopy(weights),
    )
    assert ours.iterations[:, 0].tolist() == [4, 4, 4]
    # Adam with beta1 = 0 steps lr * sign(g) on its first iteration, so a weight whose gradient is float
    # noise moves by +-lr either way, and that noise depends on the thread count: the two implementations
    # differ by up to 1.3e-4 (mean 1.2e-5) on one thread, and by up to 2.7e-3 (mean 2.6e-4) with
    # torch 2.14.1's kernels, where sign flips compound over the steps. A wrong equation moves the values
    # far more (attention weight 0 vs 50: max 0.098; lr 1e-3 vs 1.1e-3: max 0.12); the reconstruction
    # below is held to 2e-5.
    difference = (ours.values[:, 0] - values[:, 0]).abs()
    assert float(difference.max()) < 1e-2 and float(difference.mean()) < 1e-3, (
        difference.max(),
        difference.mean(),
    )
    torch.testing.assert_close(ours.reconstruction, reconstruction, atol=2e-5, rtol=1e-4)


def test_mapping_network_initialisation_is_n_0_001():
    weights = init_mapping(197, 768, 77, 768, seed=0)
    assert "width_weight" not in weights  # Table 1: the width stays the text width
    for name in ("conv0_weight", "conv1_weight", "conv2_weight"):
        assert abs(weights[name].std().item() - 0.01) < 1e-3, name
        assert abs(weights[name].mean().item()) < 1e-3, name


def test_reconstruction_improves_over_ddim(tiny_sd, images, prompts, image_encoder):
    settings = dict(num_steps=5, guidance_scale=7.5)
    ddim = invert(tiny_sd, images[:2], prompts[:2], InversionConfig.of("ddim", **settings))
    style = invert(
        tiny_sd,
        images[:2],
        prompts[:2],
        InversionConfig.of("style_diffusion", inner_steps=50, learning_rate=1e-3, **settings),
        image_encoder=image_encoder,
    )
    clean = ddim.latents.trajectory[0]
    ddim_error = (ddim.latents.reconstruction - clean).flatten(1).norm(dim=1)
    style_error = (style.latents.reconstruction - clean).flatten(1).norm(dim=1)
    assert (style_error < 0.6 * ddim_error).all(), (style_error, ddim_error)


@pytest.fixture(scope="module")
def inverted(tiny_sd, images, prompts, image_encoder):
    config = InversionConfig.of(
        "style_diffusion", num_steps=STEPS, inner_steps=3, learning_rate=1e-3, value_steps=1.0
    )
    return invert(tiny_sd, images[:2], prompts[:2], config, image_encoder=image_encoder)


CONTROLS = {
    "replace": AttentionControl("replace"),
    "refine": AttentionControl("refine"),
    "reweight": AttentionControl("none", reweight=(("circle", 1.0),)),
    "local blend": AttentionControl("replace", blend_words=("circle",)),
    "p2plus": AttentionControl("replace", unconditional_self_replace_steps=(0.0, 0.5)),
}


@pytest.mark.parametrize("mode", list(CONTROLS))
def test_an_edit_to_the_source_prompt_with_the_value_input_throughout_is_the_reconstruction(
    tiny_sd, inverted, prompts, mode
):
    request = EditRequest(0, prompts[0], CONTROLS[mode])
    [result] = edit(tiny_sd, inverted, [request])
    assert result.error is None, result.error
    difference = (result.image.float() - inverted.reconstructions[0].float()).abs().max()
    assert difference <= 1, (mode, difference)


def test_after_tau_v_the_value_input_is_the_target_prompt(tiny_sd, inverted, prompts):
    hook = inverted.latents.edit_hook
    reconstruction_values = inverted.latents.value_embeddings[:, 0]
    target = torch.randn(reconstruction_values.shape[1:])
    hook.value_steps = 1
    values = hook.edit_value_embeddings(reconstruction_values, target, None)
    torch.testing.assert_close(values[0], reconstruction_values[0])
    torch.testing.assert_close(values[1:], target.expand_as(values[1:]))
    # With the target prompt's value input from the first step, the source-prompt edit is no longer
    # the reconstruction: the value input is what made it one.
    hook.value_steps = 0
    try:
        [result] = edit(tiny_sd, inverted, [EditRequest(0, prompts[0], CONTROLS["replace"])])
    finally:
        hook.value_steps = STEPS
    assert (result.image.float() - inverted.reconstructions[0].float()).abs().max() > 2


@pytest.mark.parametrize(
    "settings, named",
    [
        ({"learning_rate": 0.0}, "learning_rate=0.0 must be > 0"),
        ({"betas": (0.0, 1.0)}, "betas=(0.0, 1.0)"),
        ({"attention_weight": -1.0}, "attention_weight=-1.0"),
        ({"inner_steps": 0}, "inner_steps=0"),
        ({"inner_steps_decay": -0.1}, "inner_steps_decay=-0.1"),
        ({"value_steps": 1.5}, "value_steps=1.5"),
    ],
)
def test_bad_parameters_are_refused_with_the_setting_named(settings, named):
    with pytest.raises(ValueError, match="style_diffusion") as error:
        InversionConfig.of("style_diffusion", **settings)
    assert named in str(error.value)


def test_inverting_without_an_image_encoder_is_refused(tiny_sd, images, prompts):
    with pytest.raises(EngineInputError, match="image_encoder"):
        invert(tiny_sd, images[:1], prompts[:1], InversionConfig.of("style_diffusion", num_steps=STEPS))


def test_inner_iterations_decay_as_ceil_k_exp_minus_0_1_i():
    schedule = inner_iterations(100, 0.1, 30)
    assert schedule[0] == 100 and len(schedule) == 30
    for index, count in enumerate(schedule):
        exact = 100 * math.exp(-0.1 * index)
        assert exact <= count < exact + 1, (index, count)


def test_image_tokens_are_every_last_layer_token_of_the_vision_tower(image_encoder):
    scorer = image_encoder.__self__
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = image_encoder(images)
    visual = scorer.model.visual
    visual.output_tokens = True
    try:
        with torch.no_grad():
            pooled, patch_tokens = visual(scorer.preprocess(images))
    finally:
        visual.output_tokens = False
    assert tokens.shape[1] == patch_tokens.shape[1] + 1  # CLS included, as Table 1's 197 = 196 + 1
    torch.testing.assert_close(tokens[:, 1:], patch_tokens)
    torch.testing.assert_close(tokens[:, 0] @ visual.proj, pooled)


def test_map_tokens_equals_table_1_layers_with_trained_biases_and_norm():
    """Each image's network, with non-zero biases and BatchNorm affine (as after training) and a width
    conv (image width 6, text width 8), equals the torch.nn layers of Table 1."""
    generator = torch.Generator().manual_seed(4)
    networks = []
    for seed in (0, 1):
        weights = init_mapping(5, 6, 4, 8, seed=seed)
        for name in weights:
            if not name.endswith("_weight") or name == "norm_weight":
                weights[name] = torch.randn(weights[name].shape, generator=generator)
        networks.append(weights)
    tokens = torch.randn(2, 5, 6, generator=generator)
    stacked = {name: torch.stack([network[name] for network in networks]) for name in networks[0]}
    ours = map_tokens(stacked, tokens)
    for image in range(2):
        network, width = _mapping_modules(networks[image])
        with torch.no_grad():
            network[2].weight.copy_(networks[image]["norm_weight"])
            network[2].bias.copy_(networks[image]["norm_bias"])
            hidden = network(tokens[image : image + 1])
            expected = width(hidden.transpose(1, 2)).transpose(1, 2)
        torch.testing.assert_close(ours[image : image + 1], expected, rtol=1e-4, atol=1e-5)


def test_the_edit_hook_takes_the_value_input_for_round_tau_v_s_steps():
    params = StyleDiffusionParams(value_steps=0.6)
    assert edit_hook(params, 10).value_steps == 6
    assert edit_hook(StyleDiffusionParams(value_steps=0.25), 10).value_steps == round(2.5)
    hook = StyleDiffusionEditHook(2)
    reconstruction_values = torch.randn(5, 3, 4)
    target = torch.randn(3, 4)
    values = hook.edit_value_embeddings(reconstruction_values, target, None)
    torch.testing.assert_close(values[:2], reconstruction_values[:2])
    torch.testing.assert_close(values[2:], target.expand(3, 3, 4))


@pytest.mark.parametrize("missing", ["images", "image_encoder"])
def test_the_method_refuses_inputs_without_images_or_an_encoder(
    tiny_sd, images, prompts, image_encoder, missing
):
    inputs = _inputs(tiny_sd, images[:1], prompts[:1], image_encoder)
    inputs = dataclasses.replace(inputs, **{missing: None})
    with pytest.raises(
        ValueError,
        match=r"^style_diffusion needs the images and an image encoder \(a CLIP vision tower\)$",
    ):
        style_diffusion_invert(inputs, StyleDiffusionParams(inner_steps=1))


def test_the_result_keeps_the_ddim_path_the_counts_and_every_steps_networks(
    tiny_sd, images, prompts, image_encoder
):
    """The trajectory is plain DDIM inversion (w = 1) with the source prompt; the iteration counts and
    each step's trained networks (the state a stored inversion restores) are passed on."""
    inputs = _inputs(tiny_sd, images[:2], prompts[:2], image_encoder)
    params = StyleDiffusionParams(inner_steps=2, early_stop_epsilon=None, learning_rate=1e-3)
    result = style_diffusion_invert(inputs, params)
    expected = _ddim_path(inputs, [None, None])
    torch.testing.assert_close(result.trajectory, expected)
    assert result.iterations.tolist() == [[count] * 2 for count in inner_iterations(2, 0.1, STEPS)]
    assert result.iterations.dtype == torch.long
    trained = train_mapping_networks(inputs, params, expected, image_encoder(inputs.images), [None, None])
    names = list(trained.weights[0])
    assert {"conv0_weight", "conv2_bias", "norm_weight"} <= set(names)
    assert set(result.kept) == {f"mapping.{step}.{name}" for step in range(STEPS) for name in names}
    for step in range(STEPS):
        for name in names:
            torch.testing.assert_close(result.kept[f"mapping.{step}.{name}"], trained.weights[step][name])
    assert not torch.equal(
        result.kept["mapping.0.conv0_weight"], result.kept[f"mapping.{STEPS - 1}.conv0_weight"]
    )


@pytest.mark.parametrize("warm_start", [False, True])
def test_without_warm_start_every_step_trains_from_the_initial_networks(
    tiny_sd, images, prompts, image_encoder, warm_start
):
    """One Adam step per timestep moves each weight by at most lr: without warm start every step's
    networks are within lr of the initial draw; with it, step i's are up to (i + 1) lr away."""
    inputs = _inputs(tiny_sd, images[:1], prompts[:1], image_encoder)
    learning_rate = 2e-3  # not Adam's default, which the networks must not fall back to
    params = StyleDiffusionParams(
        inner_steps=1, early_stop_epsilon=None, learning_rate=learning_rate, warm_start=warm_start
    )
    trajectory = _ddim_path(inputs, [None])
    tokens = image_encoder(inputs.images)
    trained = train_mapping_networks(inputs, params, trajectory, tokens, [None])
    initial = init_mapping(tokens.shape[1], tokens.shape[2], *inputs.cond_embeddings.shape[1:], params.seed)
    last = trained.weights[-1]["conv2_weight"][0]
    distance = (last - initial["conv2_weight"]).abs().max().item()
    assert trained.iterations.tolist() == [[1]] * STEPS
    first_move = (trained.weights[0]["conv2_weight"][0] - initial["conv2_weight"]).abs().max().item()
    assert first_move > 0.9 * learning_rate  # Adam's first step moves a weight by about lr
    if warm_start:
        assert distance > 1.5 * learning_rate
    else:
        assert distance <= learning_rate * 1.001
        for weights in trained.weights:
            for name, value in initial.items():
                assert (weights[name][0] - value).abs().max() <= learning_rate * 1.001, name


def _poison_image_1(unet, when):
    """A forward hook that sets image 1's output to NaN on the first call for which `when(grad)` holds
    (grad: whether the call builds a graph, i.e. an optimised branch)."""
    state = {"done": False, "seen_grad": False}

    def hook(module, args, kwargs, output):
        grad = torch.is_grad_enabled()
        if not state["done"] and when(grad, state):
            output.sample[1:] = float("nan")
            state["done"] = True
        state["seen_grad"] = state["seen_grad"] or grad
        return output

    return unet.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize(
    "when, message",
    [
        (
            lambda grad, state: grad,
            "image 1: non-finite loss in StyleDiffusion mapping-network training at step 0",
        ),
        (
            lambda grad, state: state["seen_grad"] and not grad,
            "image 1: non-finite latents in StyleDiffusion mapping-network training (reconstruction step) "
            "at step 0",
        ),
    ],
    ids=["optimisation", "reconstruction step"],
)
def test_a_nan_fails_its_image_with_the_loop_step_and_timestep_named(
    tiny_sd, images, prompts, image_encoder, when, message
):
    inputs = _inputs(tiny_sd, images[:2], prompts[:2], image_encoder)
    params = StyleDiffusionParams(inner_steps=2, early_stop_epsilon=None, learning_rate=1e-3)
    handle = _poison_image_1(tiny_sd.unet, when)
    try:
        result = style_diffusion_invert(inputs, params)
    finally:
        handle.remove()
    timestep = int(inputs.schedule.timesteps[0])
    assert result.errors[0] is None
    assert result.errors[1] == f"{message} (timestep {timestep})"


def test_step_loss_is_eq_8_per_image():
    generator = torch.Generator().manual_seed(2)
    landed, pivot = torch.randn(2, 4, 3, 3, generator=generator), torch.randn(2, 4, 3, 3, generator=generator)
    maps = [torch.rand(2, 2, 9, 5, generator=generator) for _ in range(3)]
    pivot_maps = [torch.rand(2, 2, 9, 5, generator=generator) for _ in range(3)]
    losses = step_loss(landed, pivot, maps, pivot_maps, 50.0)
    for image in range(2):
        expected = F.mse_loss(landed[image], pivot[image]) + 50.0 * sum(
            F.mse_loss(own[image], target[image]) for own, target in zip(maps, pivot_maps, strict=True)
        )
        torch.testing.assert_close(losses[image], expected)
    # Without attention layers the loss is the latent term alone.
    torch.testing.assert_close(
        step_loss(landed, pivot, [], [], 50.0), (landed - pivot).pow(2).flatten(1).mean(1)
    )


def test_a_step_ends_for_an_image_once_its_loss_is_below_epsilon_plus_i_times_2e_5():
    """The reference code breaks on loss < epsilon + i * 2e-5: at step 5 (threshold 1.1e-4) a loss just
    below ends the image's step, one at or above the threshold keeps it training."""
    params = StyleDiffusionParams(early_stop_epsilon=1e-5)
    threshold = params.early_stop_epsilon + 5 * 2e-5
    errors = [None, None, None, None]
    still = still_active([0, 1, 2, 3], [1.05e-4, threshold, 1.15e-4, 5e-6], 5, 801, params, errors)
    assert still == [1, 2]
    assert errors == [None] * 4
    # Without epsilon nothing stops early; a non-finite loss fails its image, named.
    never = StyleDiffusionParams(early_stop_epsilon=None)
    assert still_active([0, 1], [0.0, float("nan")], 2, 601, never, errors) == [0]
    assert (
        errors[1]
        == "image 1: non-finite loss in StyleDiffusion mapping-network training at step 2 (timestep 601)"
    )


def test_a_nan_in_the_ddim_inversion_fails_its_image_there(tiny_sd, images, prompts, image_encoder):
    inputs = _inputs(tiny_sd, images[:2], prompts[:2], image_encoder)
    handle = _poison_image_1(tiny_sd.unet, lambda grad, state: True)  # the inversion's first call
    try:
        result = style_diffusion_invert(inputs, StyleDiffusionParams(inner_steps=1))
    finally:
        handle.remove()
    first = STEPS - 1  # the inversion walks the grid from the clean end
    timestep = int(inputs.schedule.timesteps[first])
    assert result.errors == [
        None,
        f"image 1: non-finite latents in DDIM inversion at step {first} (timestep {timestep})",
    ]
    assert result.iterations[:, 1].sum() == 0  # the failed image trains no network
