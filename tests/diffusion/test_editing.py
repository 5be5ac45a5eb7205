"""The Prompt-to-Prompt batch observed through an instrumented controller, on the tiny model."""

import pytest
import torch

from pipeline.diffusion import editing
from pipeline.diffusion.attention import AttentionController
from pipeline.diffusion.tokens import word_positions
from pipeline.engine import AttentionControl, EditRequest, InversionConfig, edit, invert
from pipeline.models.build import SDArchitecture, build_random_sd
from pipeline.models.loading import load_diffusion_model

STEPS = 5
SOURCE = "a red circle on a white background"
TARGET = "a red square on a white background"


class RecordingController(AttentionController):
    """Keeps every layer's edited probabilities: (step, is_cross, (2, N, heads, q, k) tensor)."""

    calls: list

    def __call__(self, probs, is_cross, heads):
        out = super().__call__(probs, is_cross, heads)
        record = out.view(2, self.plan.num_rows, heads, *out.shape[1:]).detach().clone()
        RecordingController.calls.append((self.step, is_cross, record))
        return out


@pytest.fixture
def recorded(monkeypatch):
    RecordingController.calls = []
    monkeypatch.setattr(editing, "AttentionController", RecordingController)
    return RecordingController.calls


@pytest.fixture(scope="module")
def ddim_inversion(tiny_sd, images):
    return invert(
        tiny_sd, images[:1], [SOURCE], InversionConfig.of("ddim", num_steps=STEPS, guidance_scale=7.5)
    )


def test_word_swap_injects_source_maps_of_unchanged_words_and_self_attention_in_their_windows(
    tiny_sd, ddim_inversion, recorded
):
    _check_word_swap_windows(tiny_sd, ddim_inversion, recorded)


@pytest.fixture(scope="module")
def plain_top_sd(tmp_path_factory):
    """The tiny model with SDXL's layout: no attention at its full-resolution level (16x16 of 32 px)."""
    folder = tmp_path_factory.mktemp("plain-top-sd")
    arch = SDArchitecture(
        image_size=32, vae_channels=(16, 32), unet_channels=(16, 16, 32), unet_plain_levels=1
    )
    return load_diffusion_model(build_random_sd(folder, arch, seed=0, unet_output_scale=0.05))


def test_word_swap_controls_a_unet_without_attention_at_its_top_level(plain_top_sd, images, recorded):
    inversion = invert(
        plain_top_sd, images[:1], [SOURCE], InversionConfig.of("ddim", num_steps=STEPS, guidance_scale=7.5)
    )
    _check_word_swap_windows(plain_top_sd, inversion, recorded)
    # the controller met the layers below the top level only: 8x8 (64 queries) and the mid block's 4x4
    assert {probs.shape[-2] for _, _, probs in recorded} == {64, 16}


def _check_word_swap_windows(model, inversion, recorded) -> None:
    control = AttentionControl("replace", cross_replace_steps=0.5, self_replace_steps=0.4)
    edit(model, inversion, [EditRequest(0, TARGET, control)])
    cross_steps, self_steps = int(0.5 * (STEPS + 1)), int(0.4 * STEPS)  # 3 and 2
    unchanged = [
        p for word in ("red", "white", "background") for p in word_positions(model.tokenizer, TARGET, word)
    ]
    saw = {"cross_in": 0, "cross_out": 0, "self_in": 0, "self_out": 0}
    for step, is_cross, probs in recorded:
        source, edited = probs[1, 0], probs[1, 1]
        if is_cross and step < cross_steps:
            torch.testing.assert_close(edited[..., unchanged], source[..., unchanged])
            saw["cross_in"] += 1
        elif is_cross:
            assert not torch.allclose(edited[..., unchanged], source[..., unchanged])
            saw["cross_out"] += 1
        elif step < self_steps:
            torch.testing.assert_close(edited, source)
            if step > 0:  # plain P2P leaves the unconditional branch alone once the latents differ
                assert not torch.allclose(probs[0, 1], probs[0, 0])
            saw["self_in"] += 1
        else:
            saw["self_out"] += 1
    # self-attention maps are requested only while a self window is open
    assert saw["cross_in"] > 0 and saw["cross_out"] > 0 and saw["self_in"] > 0 and saw["self_out"] == 0, saw


def test_p2plus_with_mode_none_injects_unconditional_self_attention(tiny_sd, ddim_inversion, recorded):
    control = AttentionControl("none", unconditional_self_replace_steps=0.6)
    edit(tiny_sd, ddim_inversion, [EditRequest(0, TARGET, control)])
    tau_u = int(0.6 * STEPS)
    self_calls = [(step, probs) for step, is_cross, probs in recorded if not is_cross]
    assert {step for step, _ in self_calls} == set(range(tau_u))  # layers asked for maps only in the window
    for _, probs in self_calls:
        torch.testing.assert_close(probs[0, 1], probs[0, 0])
    cross = [(step, probs) for step, is_cross, probs in recorded if is_cross]
    assert cross and not torch.allclose(cross[0][1][1, 1], cross[0][1][1, 0])  # no cross injection


def test_reweight_with_mode_none_injects_scaled_source_maps_in_the_window(tiny_sd, ddim_inversion, recorded):
    control = AttentionControl("none", cross_replace_steps=0.5, reweight=(("red", 2.0),))
    edit(tiny_sd, ddim_inversion, [EditRequest(0, SOURCE, control)])
    red = word_positions(tiny_sd.tokenizer, SOURCE, "red")
    cross_steps = int(0.5 * (STEPS + 1))
    for step, is_cross, probs in recorded:
        if not is_cross:
            continue
        source, edited = probs[1, 0], probs[1, 1]
        if step < cross_steps:
            torch.testing.assert_close(edited[..., red], 2.0 * source[..., red])
        else:  # own maps: still a distribution over tokens, not scaled
            torch.testing.assert_close(edited.sum(-1), torch.ones_like(edited.sum(-1)))


def test_blend_start_one_never_blends(tiny_sd, ddim_inversion):
    blend = AttentionControl(
        "replace", blend_words=("circle", "square"), blend_threshold=0.95, blend_start=1.0
    )
    plain = AttentionControl("replace")
    blended, unblended = edit(
        tiny_sd, ddim_inversion, [EditRequest(0, TARGET, blend), EditRequest(0, TARGET, plain)]
    )
    torch.testing.assert_close(blended.latents, unblended.latents, atol=1e-5, rtol=1e-4)
    early = AttentionControl(
        "replace", blend_words=("circle", "square"), blend_threshold=0.95, blend_start=0.2
    )
    assert not torch.allclose(
        edit(tiny_sd, ddim_inversion, [EditRequest(0, TARGET, early)])[0].latents, unblended.latents
    )


def test_changed_words_are_exactly_the_words_that_differ():
    assert editing.changed_words(SOURCE, TARGET) == ([2], [2])
    assert editing.changed_words("a circle on a white background", "a red circle on a white background") == (
        [],
        [1],
    )
    assert editing.changed_words(
        "a red circle on a white background", "a red circle on a black background and a star"
    ) == ([5], [5, 7, 8, 9])


def test_mask_words_take_blend_words_from_each_prompt_and_exclude_words_apart(tiny_sd):
    tokenizer = tiny_sd.tokenizer
    control = AttentionControl(
        "replace",
        blend_words=("circle", "square"),
        blend_exclude_words=("white",),
        blend_exclude_threshold=0.7,
    )
    words = editing.mask_words(tokenizer, SOURCE, EditRequest(0, TARGET, control))
    assert words.exclude_threshold == 0.7  # the control's own, not the default 0.3
    ids = {prompt: tokenizer(prompt).input_ids for prompt in (SOURCE, TARGET)}

    def at(prompt, word):  # the single-token word's position, read off the token ids
        return [ids[prompt].index(tokenizer.convert_tokens_to_ids(f"{word}</w>"))]

    assert list(words.source) == at(SOURCE, "circle")
    assert list(words.target) == at(TARGET, "square")
    assert list(words.source_exclude) == at(SOURCE, "white") and list(words.target_exclude) == at(
        TARGET, "white"
    )
    changed = editing.mask_words(tokenizer, SOURCE, EditRequest(0, TARGET, AttentionControl("replace")))
    assert list(changed.source) == at(SOURCE, "circle") and list(changed.target) == at(TARGET, "square")


def test_each_mode_maps_source_tokens_to_target_tokens_as_p2p_does(tiny_sd):
    """replace: one to one at the swapped word; refine: the shared words keep their source positions and
    added words get alpha 0 (P2P's AttentionRefine); none: the identity."""
    tokenizer = tiny_sd.tokenizer
    longer = SOURCE + " with a star"
    shared = len(tokenizer(SOURCE).input_ids) - 1  # BOS and the seven words; the EOS moves
    refine = editing.edit_controls(
        tokenizer, SOURCE, EditRequest(0, longer, AttentionControl("refine")), STEPS
    )
    for position in range(shared):
        column = refine.matrix[:, position]  # matrix is (source, target): the target token's source
        assert column.argmax() == position and column.sum() == 1
        assert refine.alpha[position] == 1.0
    assert refine.alpha[shared : shared + 3].tolist() == [0.0, 0.0, 0.0]  # "with a star" is new
    replace = editing.edit_controls(
        tokenizer, SOURCE, EditRequest(0, TARGET, AttentionControl("replace")), STEPS
    )
    circle, square = (
        word_positions(tokenizer, prompt, word)[0]
        for prompt, word in ((SOURCE, "circle"), (TARGET, "square"))
    )
    assert replace.matrix[circle, square] == 1.0 and torch.equal(
        replace.alpha, torch.ones_like(replace.alpha)
    )
    none = editing.edit_controls(tokenizer, SOURCE, EditRequest(0, longer, AttentionControl("none")), STEPS)
    assert torch.equal(none.matrix, torch.eye(tokenizer.model_max_length))
    assert torch.equal(none.alpha, torch.ones(tokenizer.model_max_length))


def test_a_per_word_cross_window_is_read_off_the_target_prompt(tiny_sd):
    """P2P's dict form of cross_replace_steps: the target word "square" has its own window (int(f (S + 1))
    steps: 0.2 of 6 -> 1), the other tokens the default (0.8 of 6 -> 4)."""
    tokenizer = tiny_sd.tokenizer
    control = AttentionControl("replace", cross_replace_steps=0.8, cross_replace_words=(("square", 0.2),))
    controls = editing.edit_controls(tokenizer, SOURCE, EditRequest(0, TARGET, control), STEPS)
    square, red = (word_positions(tokenizer, TARGET, word)[0] for word in ("square", "red"))
    assert controls.window[:, square].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert controls.window[:, red].tolist() == [1.0, 1.0, 1.0, 1.0, 0.0]


class PoisonedSteer:
    """The inversion's edit hook, but the edit rows of one image turn NaN after sampling step `step`."""

    def __init__(self, hook, image: int, step: int):
        self.hook, self.image, self.step, self.calls = hook, image, step, 0

    def __getattr__(self, name):
        return getattr(self.hook, name)

    def steer(self, latent, pivot, request):
        steered = self.hook.steer(latent, pivot, request)
        if request.image_index == self.image:
            steered = steered * float("nan") if self.calls == self.step else steered
            self.calls += 1
        return steered


@pytest.mark.parametrize("step", [0, 3])
def test_an_edit_that_turns_non_finite_fails_alone_naming_its_step(tiny_sd, images, step):
    inversion = invert(
        tiny_sd,
        images[:2],
        [SOURCE, SOURCE],
        InversionConfig.of("ddim", num_steps=STEPS, guidance_scale=7.5),
    )
    inversion.latents.edit_hook = PoisonedSteer(inversion.latents.edit_hook, image=0, step=step)
    requests = [EditRequest(0, TARGET), EditRequest(1, TARGET)]
    # The failing edit comes first: the ones after it still get their results.
    poisoned, healthy = edit(tiny_sd, inversion, requests)
    assert poisoned.request is requests[0] and healthy.request is requests[1]
    timestep = int(inversion.schedule.timesteps[step])
    assert poisoned.error == f"image 0: non-finite latents at edit step {step} (timestep {timestep})"
    assert poisoned.image is None and poisoned.mask is None and poisoned.latents is None
    assert healthy.error is None and healthy.image is not None and healthy.mask is not None
    assert poisoned.seconds == healthy.seconds > 0  # the batch's time, shared


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"image_index": 1}, "requests[1].image_index=1 is outside the inverted batch of 1 images."),
        ({"target_prompt": "   "}, "requests[1].target_prompt is empty; give the prompt"),
        ({"target_prompt": ""}, "requests[1].target_prompt is empty; give the prompt"),
        ({"target_prompt": "star " * 80}, "requests[1].target_prompt 'star star"),
        (
            {"sample_temperature": -1.0},
            "requests[1].sample_temperature=-1.0 must be >= 0 (0 samples the mean).",
        ),
        (
            {"control": AttentionControl("bogus")},
            "requests[1].control.mode='bogus'; choose none, replace or refine.",
        ),
        *(
            (
                {"control": AttentionControl("replace", **{name: bounds})},
                f"requests[1].control.{name}={bounds!r} must be",
            )
            for name, bounds in (
                ("cross_replace_steps", 1.5),
                ("self_replace_steps", (0.5, 0.2)),
                ("unconditional_self_replace_steps", -0.1),
                ("blend_start", 2.0),
            )
        ),
        (
            {"control": AttentionControl("replace", cross_replace_words=(("square", 1.5),))},
            "requests[1].control.cross_replace_words['square']=1.5 must be",
        ),
        *(
            (
                {"control": AttentionControl("replace", **{kind: ("dog",)})},
                f"requests[1].control.{kind}: 'dog' is in neither the source prompt",
            )
            for kind in ("blend_words", "blend_exclude_words")
        ),
    ],
)
def test_an_unusable_request_is_refused_naming_its_position_and_field(
    tiny_sd, ddim_inversion, changes, message
):
    import dataclasses

    from pipeline.diffusion.errors import EngineInputError

    bad = dataclasses.replace(EditRequest(0, TARGET), **changes)
    with pytest.raises(EngineInputError) as raised:
        edit(tiny_sd, ddim_inversion, [EditRequest(0, TARGET), bad])
    assert str(raised.value).startswith(message), str(raised.value)


def test_a_sample_at_temperature_zero_is_accepted_and_is_the_mean_decode(tiny_sd, ddim_inversion):
    from pipeline.methods.cond_vae import ConditionalEmbeddingVAE, VAESizes

    tokens, channels = ddim_inversion.latents.cond_embeddings.shape[-2:]
    generator = torch.Generator().manual_seed(0)
    vae = ConditionalEmbeddingVAE(tokens, channels, VAESizes(4, 2, 8), generator).requires_grad_(False)
    with torch.no_grad():
        vae.expand_weight.copy_(torch.randn(vae.expand_weight.shape, generator=generator))
    requests = [
        EditRequest(0, TARGET, seed=seed, sample_temperature=0.0, embedding_vae=vae) for seed in (1, 2)
    ]
    first, second = edit(tiny_sd, ddim_inversion, requests)
    assert first.error is None and torch.equal(first.latents, second.latents)  # the seed does not matter
