import pytest
import torch
from attention_sides import attention_calls

from pipeline.diffusion.attention import AttentionController, EditPlan
from pipeline.engine import AttentionControl, EditRequest, InversionConfig, edit, invert

L = 77


STEPS = 4


def _plan(
    cross_until=2, self_until=1, uncond_self_until=0, matrix=None, alpha=None, scales=None, window=None
):
    if window is None:
        window = torch.zeros(STEPS, L)
        window[:cross_until] = 1.0
    return EditPlan(
        num_rows=2,
        edit_rows=torch.tensor([1]),
        edit_sources=torch.tensor([0]),
        cross_matrix=(torch.eye(L) if matrix is None else matrix)[None],
        cross_alpha=(torch.ones(L) if alpha is None else alpha)[None],
        equalizer=(torch.ones(L) if scales is None else scales)[None],
        cross_window=window[None],
        self_window=torch.tensor([[0, self_until]]),
        uncond_self_window=torch.tensor([[0, uncond_self_until]]),
    )


def _probs(keys, heads=2, queries=4):
    return torch.rand(2 * 2 * heads, queries, keys).softmax(-1)


def test_cross_replace_copies_source_maps_through_the_mapper_within_the_window():
    swap = torch.eye(L)
    swap[[3, 4]] = swap[[4, 3]]  # token 3 of the source feeds token 4 of the target and vice versa
    controller = AttentionController(_plan(cross_until=2, matrix=swap), latent_size=8, mask_resolution=2)
    probs = _probs(L)
    out = controller(probs.clone(), is_cross=True, heads=2).view(2, 2, 2, 4, L)
    original = probs.view(2, 2, 2, 4, L)
    torch.testing.assert_close(out[1, 1], original[1, 0] @ swap)
    torch.testing.assert_close(out[0], original[0])  # unconditional branch untouched (plain P2P)
    controller.step = 2
    out = controller(probs.clone(), is_cross=True, heads=2).view(2, 2, 2, 4, L)
    torch.testing.assert_close(out[1, 1], original[1, 1])


def test_reweight_scales_the_injected_maps_inside_the_window_only():
    """P2P's AttentionReweight: (mapped source maps) * c within the cross window, the edit row's own
    unscaled maps after it."""
    scales = torch.ones(L)
    scales[5] = 3.0
    controller = AttentionController(_plan(cross_until=2, scales=scales), latent_size=8, mask_resolution=2)
    probs = _probs(L)
    original = probs.view(2, 2, 2, 4, L)
    out = controller(probs.clone(), is_cross=True, heads=2).view(2, 2, 2, 4, L)
    source = original[1, 0]
    torch.testing.assert_close(out[1, 1, ..., 5], 3.0 * source[..., 5])
    torch.testing.assert_close(out[1, 1, ..., 6], source[..., 6])
    controller.step = 2
    out = controller(probs.clone(), is_cross=True, heads=2).view(2, 2, 2, 4, L)
    torch.testing.assert_close(out[1, 1], original[1, 1])  # own maps, token 5 not scaled


def test_per_token_windows_inject_each_token_for_its_own_steps():
    window = torch.zeros(STEPS, L)
    window[:3] = 1.0
    window[:, 4] = 0.0
    window[1:2, 4] = 1.0  # token 4 is injected at step 1 only
    controller = AttentionController(_plan(window=window), latent_size=8, mask_resolution=2)
    probs = _probs(L)
    original = probs.view(2, 2, 2, 4, L)
    for step, token_4_injected in ((0, False), (1, True), (2, False)):
        controller.step = step
        out = controller(probs.clone(), is_cross=True, heads=2).view(2, 2, 2, 4, L)
        torch.testing.assert_close(out[1, 1, ..., 3], original[1, 0, ..., 3])
        expected = original[1, 0 if token_4_injected else 1, ..., 4]
        torch.testing.assert_close(out[1, 1, ..., 4], expected)


def test_refine_mixes_source_maps_by_alpha():
    alpha = torch.ones(L)
    alpha[2] = 0.0  # a new token: keeps its own map
    index = torch.arange(L)
    index[3] = 2  # target token 3 copies source token 2
    matrix = torch.zeros(L, L)
    matrix[index, torch.arange(L)] = 1.0
    controller = AttentionController(_plan(matrix=matrix, alpha=alpha), latent_size=8, mask_resolution=2)
    probs = _probs(L)
    original = probs.view(2, 2, 2, 4, L)
    out = controller(probs.clone(), is_cross=True, heads=2).view(2, 2, 2, 4, L)
    torch.testing.assert_close(out[1, 1, ..., 2], original[1, 1, ..., 2])
    torch.testing.assert_close(out[1, 1, ..., 3], original[1, 0, ..., 2])
    torch.testing.assert_close(out[1, 1, ..., 7], original[1, 0, ..., 7])


def test_recorded_maps_are_the_injected_ones():
    """P2P's attention store holds the edit rows' maps after injection (local blend reads those)."""
    swap = torch.eye(L)
    swap[[3, 4]] = swap[[4, 3]]
    controller = AttentionController(_plan(matrix=swap), latent_size=8, mask_resolution=2)
    probs = _probs(L)
    out = controller(probs.clone(), is_cross=True, heads=2).view(2, 2, 2, 4, L)
    torch.testing.assert_close(controller.cross_maps, out[1].mean(dim=1))
    assert not torch.allclose(controller.cross_maps[1], probs.view(2, 2, 2, 4, L)[1, 1].mean(dim=0))


def test_p2plus_injects_unconditional_self_attention_for_tau_u_steps():
    controller = AttentionController(
        _plan(self_until=1, uncond_self_until=3), latent_size=8, mask_resolution=2
    )
    probs = _probs(keys=4)
    original = probs.view(2, 2, 2, 4, 4)
    out = controller(probs.clone(), is_cross=False, heads=2).view(2, 2, 2, 4, 4)
    torch.testing.assert_close(out[1, 1], original[1, 0])
    torch.testing.assert_close(out[0, 1], original[0, 0])
    controller.step = 2  # conditional self-replacement over, unconditional (P2Plus) still on
    out = controller(probs.clone(), is_cross=False, heads=2).view(2, 2, 2, 4, 4)
    torch.testing.assert_close(out[1, 1], original[1, 1])
    torch.testing.assert_close(out[0, 1], original[0, 0])
    torch.testing.assert_close(out[:, 0], original[:, 0])


@pytest.fixture(scope="module")
def null_text_inversion(tiny_sd, images, prompts):
    config = InversionConfig.of(method="null_text", num_steps=5, guidance_scale=7.5, inner_steps=2)
    return invert(tiny_sd, images[:2], prompts[:2], config)


def test_replace_with_the_source_prompt_reproduces_the_reconstruction(tiny_sd, null_text_inversion, prompts):
    control = AttentionControl("replace", unconditional_self_replace_steps=0.5)
    results = edit(tiny_sd, null_text_inversion, [EditRequest(i, prompts[i], control) for i in range(2)])
    for index, result in enumerate(results):
        torch.testing.assert_close(
            result.latents, null_text_inversion.latents.reconstruction[index], atol=1e-5, rtol=1e-4
        )
        assert result.mask is None  # no word changed


def test_local_blend_keeps_latents_outside_the_mask(tiny_sd, null_text_inversion):
    # A random-weight model attends almost uniformly, so only a high threshold leaves part of the
    # latent outside the mask.
    control = AttentionControl("replace", blend_words=("circle", "square"), blend_threshold=0.95)
    result = edit(
        tiny_sd, null_text_inversion, [EditRequest(0, "a red square on a white background", control)]
    )[0]
    factor = tiny_sd.vae_scale_factor
    latent_mask = result.mask[::factor, ::factor]
    assert 0 < latent_mask.sum() < latent_mask.numel()
    outside = ~latent_mask
    reconstruction = null_text_inversion.latents.reconstruction[0]
    torch.testing.assert_close(result.latents[:, outside], reconstruction[:, outside], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(result.latents[:, latent_mask], reconstruction[:, latent_mask], atol=1e-4)


def test_batched_edits_equal_edits_run_one_by_one(tiny_sd, null_text_inversion):
    requests = [
        EditRequest(0, "a red square on a white background", AttentionControl("replace")),
        EditRequest(
            1, "a blue big square on a gray background", AttentionControl("refine", reweight=(("big", 2.0),))
        ),
        EditRequest(
            0,
            "a red star on a white background",
            AttentionControl("replace", unconditional_self_replace_steps=1.0),
        ),
    ]
    together = edit(tiny_sd, null_text_inversion, requests)
    for request, batched in zip(requests, together, strict=True):
        alone = edit(tiny_sd, null_text_inversion, [request])[0]
        torch.testing.assert_close(batched.latents, alone.latents, atol=1e-4, rtol=1e-4)
        assert batched.mask is not None and torch.equal(batched.mask, alone.mask)


def test_windows_end_before_their_last_step():
    controller = AttentionController(
        _plan(self_until=1, uncond_self_until=3), latent_size=8, mask_resolution=2
    )
    probs = _probs(keys=4)
    original = probs.view(2, 2, 2, 4, 4)
    controller.step = 3  # [0, 3) is over
    out = controller(probs.clone(), is_cross=False, heads=2).view(2, 2, 2, 4, 4)
    torch.testing.assert_close(out, original)
    assert not controller.wants_probs(is_cross=False, num_queries=4)


def test_self_attention_is_controlled_only_up_to_a_quarter_of_the_latent_positions():
    controller = AttentionController(_plan(self_until=2), latent_size=8, mask_resolution=2)
    assert controller.wants_probs(is_cross=False, num_queries=16)  # (8 / 2)^2
    assert not controller.wants_probs(is_cross=False, num_queries=17)
    assert controller.wants_probs(is_cross=True, num_queries=64)


def test_recorded_maps_sum_over_layers_at_the_mask_resolution_only():
    controller = AttentionController(_plan(cross_until=0), latent_size=8, mask_resolution=4)
    first, second, other = _probs(L, queries=16), _probs(L, queries=16), _probs(L, queries=4)
    controller(first.clone(), is_cross=True, heads=2)
    controller(other.clone(), is_cross=True, heads=2)  # 2x2 layer: not the mask resolution
    controller(second.clone(), is_cross=True, heads=2)
    expected = first.view(2, 2, 2, 16, L)[1].mean(dim=1) + second.view(2, 2, 2, 16, L)[1].mean(dim=1)
    torch.testing.assert_close(controller.cross_maps, expected)


def _unet(down: tuple[str, ...], up: tuple[str, ...], mid: str | None = "UNetMidBlock2DCrossAttn"):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8,) * len(down),
        down_block_types=down,
        up_block_types=up,
        mid_block_type=mid,
        layers_per_block=1,
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=4,
    ).eval()


SD_LAYOUT = (
    ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)


@pytest.mark.parametrize(
    ("down", "up", "mid", "latent_size", "mask_side"),
    [
        (*SD_LAYOUT, "UNetMidBlock2DCrossAttn", 16, 4),  # Stable Diffusion 1.x's layout: 64 -> 16
        (*SD_LAYOUT, "UNetMidBlock2DCrossAttn", 18, 5),  # sides 18, 9, 5, 3: the smallest >= 4.5
        (*SD_LAYOUT, "UNetMidBlock2DCrossAttn", 6, 2),  # sides 6, 3, 2, 1: the smallest >= 1.5
        (*SD_LAYOUT, "UNetMidBlock2DCrossAttn", 9, 3),  # sides 9, 5, 3, 2: the smallest >= 2.25
        # self-attention-only blocks have no cross-attention layer to count
        (
            ("AttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            ("UpBlock2D", "CrossAttnUpBlock2D", "AttnUpBlock2D"),
            None,
            16,
            8,
        ),
        (("CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"), ("UpBlock2D",) * 3, None, 16, 16),
        (("DownBlock2D",) * 3, ("UpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"), None, 16, 16),
        (("DownBlock2D",) * 3, ("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), None, 16, 8),
        # only the mid block attends, below a quarter of the latent: the largest side there is
        (("DownBlock2D",) * 4, ("UpBlock2D",) * 4, "UNetMidBlock2DCrossAttn", 16, 2),
        (
            ("DownBlock2D",) * 3 + ("CrossAttnDownBlock2D", "DownBlock2D"),
            ("UpBlock2D", "CrossAttnUpBlock2D") + ("UpBlock2D",) * 3,
            "UNetMidBlock2DCrossAttn",
            32,
            4,
        ),
    ],
)
def test_cross_attention_sides_are_the_ones_a_forward_pass_meets(down, up, mid, latent_size, mask_side):
    from pipeline.diffusion.attention import cross_attention_resolutions, mask_resolution_for

    unet = _unet(down, up, mid)
    measured_sides = sorted(side for side, cross in attention_calls(unet, latent_size) if cross)
    assert cross_attention_resolutions(unet, latent_size) == measured_sides
    assert mask_resolution_for(unet, latent_size) == mask_side


def test_a_unet_without_cross_attention_cannot_be_controlled():
    from pipeline.diffusion.attention import mask_resolution_for

    unet = _unet(("DownBlock2D",) * 2, ("UpBlock2D",) * 2, None)
    with pytest.raises(
        ValueError, match="^the UNet has no cross-attention layers; attention control needs them$"
    ):
        mask_resolution_for(unet, 16)


@pytest.mark.parametrize("layout", ["tokens", "spatial"])
def test_the_processor_asks_the_controller_with_the_layers_query_count(layout):
    from diffusers.models.attention_processor import Attention

    from pipeline.diffusion.attention import ControlledAttnProcessor

    class Asked:
        def __init__(self):
            self.questions = []

        def wants_probs(self, is_cross, num_queries):
            self.questions.append((is_cross, num_queries))
            return False

    attn = Attention(query_dim=6, heads=2, dim_head=3)
    controller = Asked()
    # 20 queries of 6 channels: (B, N, C) tokens or (B, C, H, W) = (1, 6, 4, 5) spatial
    hidden = torch.rand(1, 20, 6) if layout == "tokens" else torch.rand(1, 6, 4, 5)
    ControlledAttnProcessor(controller)(attn, hidden)
    assert controller.questions == [(False, 20)]


def _layer(kind: str):
    """A diffusers attention layer of each kind the processor must handle, with random weights."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    if kind == "spatial":  # VAE-style: 4-D input, group norm, spatial norm, residual, output rescaled
        return Attention(
            query_dim=32,  # SpatialNorm's own group norm has 32 groups
            heads=2,
            dim_head=4,
            norm_num_groups=4,
            spatial_norm_dim=3,
            residual_connection=True,
            rescale_output_factor=2.0,
            bias=True,
        ).eval()
    return Attention(  # cross-attention with a normed encoder input
        query_dim=8, cross_attention_dim=6, heads=2, dim_head=4, cross_attention_norm="layer_norm"
    ).eval()


def _inputs(kind: str) -> dict:
    generator = torch.Generator().manual_seed(1)
    if kind == "spatial":
        return {
            "hidden_states": torch.randn(2, 32, 4, 5, generator=generator),
            "temb": torch.randn(2, 3, 2, 3, generator=generator),  # SpatialNorm's zq
        }
    mask = torch.ones(2, 7)
    mask[0, 5:] = 0  # the first row may not attend to its last two tokens
    return {
        "hidden_states": torch.randn(2, 20, 8, generator=generator),
        "encoder_hidden_states": torch.randn(2, 7, 6, generator=generator),
        "attention_mask": ((1 - mask) * -10000.0)[:, None, :],  # (B, 1, L), as the UNet passes it
    }


class _Identity:
    """A controller that asks for every map and returns it unchanged."""

    def __init__(self):
        self.calls = 0

    def wants_probs(self, is_cross, num_queries):
        return True

    def __call__(self, probs, is_cross, heads):
        self.calls += 1
        return probs


@pytest.mark.parametrize("kind", ["spatial", "cross"])
@pytest.mark.parametrize("controlled", [False, True])
def test_the_processor_computes_diffusers_attention_on_every_kind_of_layer(kind, controlled):
    """Both paths (fused, and explicit probabilities for a controller) equal diffusers' AttnProcessor
    on 4-D spatial layers with group and spatial norms, residual and rescaling, and on cross-attention
    with a normed encoder input and an attention mask."""
    from diffusers.models.attention_processor import AttnProcessor

    from pipeline.diffusion.attention import ControlledAttnProcessor

    attn, inputs = _layer(kind), _inputs(kind)
    with torch.no_grad():
        expected = AttnProcessor()(attn, **inputs)
        controller = _Identity() if controlled else None
        out = ControlledAttnProcessor(controller)(attn, **inputs)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert controller is None or controller.calls == 1
    # the mask and the norms matter here, so a path that drops one of them fails the comparison
    with torch.no_grad():
        plain = (
            {**inputs, "attention_mask": None}
            if kind == "cross"
            else {**inputs, "temb": torch.zeros_like(inputs["temb"])}
        )
        assert (AttnProcessor()(attn, **plain) - expected).abs().max() > 1e-3
