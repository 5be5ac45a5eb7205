"""DiffusionCLIP maths (papers/004 eqs. 9-14) against closed forms and second implementations."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler

from pipeline.diffusion.tokens import encode_prompts
from pipeline.methods import diffusion_clip as dc


def _constant_noise(noise: torch.Tensor) -> dc.NoiseFn:
    return lambda latents, timestep: noise.expand_as(latents)


def test_grids_of_different_step_counts_share_the_return_step(tiny_sd):
    forward = dc.ReturnGrid.from_scheduler(tiny_sd.scheduler, 500, 40)
    generative = dc.ReturnGrid.from_scheduler(tiny_sd.scheduler, 500, 6)
    assert forward.return_step == generative.return_step == 500
    assert forward.num_steps == 40 and generative.num_steps == 6
    assert forward.alphas[-1] == generative.alphas[-1] == tiny_sd.scheduler.alphas_cumprod[500].double()
    assert forward.alphas[0] == generative.alphas[0] == tiny_sd.scheduler.final_alpha_cumprod.double()
    assert bool((forward.timesteps[1:] > forward.timesteps[:-1]).all())
    with pytest.raises(ValueError, match="t0"):
        dc.ReturnGrid.from_scheduler(tiny_sd.scheduler, 1000, 6)
    with pytest.raises(ValueError, match="num_steps"):
        dc.ReturnGrid.from_scheduler(tiny_sd.scheduler, 500, 0)


def test_forward_matches_the_closed_form_for_a_constant_noise(tiny_sd):
    """With eps independent of x, x_t / sqrt(a_t) - sqrt(1/a_t - 1) eps is invariant along eq. 12."""
    grid = dc.ReturnGrid.from_scheduler(tiny_sd.scheduler, 400, 40)
    generator = torch.Generator().manual_seed(0)
    clean, noise = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(1, 4, 8, 8, generator=generator)
    noisy = dc.forward(_constant_noise(noise), grid, clean.double())
    a0, at = grid.alpha(0), grid.alpha(grid.num_steps)
    expected = at**0.5 * (clean.double() - (1 - a0) ** 0.5 * noise) / a0**0.5 + (1 - at) ** 0.5 * noise
    torch.testing.assert_close(noisy, expected)


def test_generate_undoes_forward_on_other_grids_for_a_constant_noise(tiny_sd):
    """S_for and S_gen may differ: both grids end at t0, and the endpoints alone fix the result."""
    noise = torch.randn(1, 4, 8, 8)
    clean = torch.randn(3, 4, 8, 8).double()
    noisy = dc.forward(
        _constant_noise(noise), dc.ReturnGrid.from_scheduler(tiny_sd.scheduler, 500, 40), clean
    )
    back = dc.generate(_constant_noise(noise), dc.ReturnGrid.from_scheduler(tiny_sd.scheduler, 500, 6), noisy)
    torch.testing.assert_close(back, clean)


def test_forward_then_generate_reconstructs_with_a_real_unet(tiny_sd, images):
    from pipeline.models.vae import encode_images

    condition = encode_prompts(tiny_sd.tokenizer, tiny_sd.text_encoder, [""])

    def noise_fn(latents, timestep):
        return tiny_sd.unet(
            latents, timestep, encoder_hidden_states=condition.expand(len(latents), -1, -1)
        ).sample

    clean = encode_images(tiny_sd, images)
    grid = dc.ReturnGrid.from_scheduler(tiny_sd.scheduler, 300, 30)
    with torch.no_grad():
        back = dc.generate(noise_fn, grid, dc.forward(noise_fn, grid, clean))
        drift = (back - clean).abs().max()
        noisy = dc.forward(noise_fn, grid, clean)
    assert drift < 0.05 * clean.abs().max()
    assert (noisy - clean).abs().max() > 10 * drift  # the round trip went somewhere


def test_direction_loss_is_one_minus_the_cosine_of_the_directions():
    generator = torch.Generator().manual_seed(1)
    source = torch.nn.functional.normalize(torch.randn(4, 8, generator=generator), dim=-1)
    edited = torch.nn.functional.normalize(torch.randn(4, 8, generator=generator), dim=-1)
    text = torch.randn(4, 8, generator=generator)
    image_direction = edited - source
    expected = 1 - (image_direction * text).sum(-1) / (image_direction.norm(dim=-1) * text.norm(dim=-1))
    torch.testing.assert_close(dc.direction_loss(edited, source, text), expected)
    torch.testing.assert_close(
        dc.direction_loss(source + text, source, text), torch.zeros(4), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(dc.direction_loss(source - text, source, text), 2 * torch.ones(4))


def test_loss_weights_the_l1_identity_term_by_lambda():
    source = torch.zeros(2, 3, 4, 4)
    edited = torch.full((2, 3, 4, 4), 0.5)
    embed = lambda images: torch.nn.functional.normalize(images.flatten(1)[:, :5] + torch.arange(5.0), dim=-1)  # noqa: E731
    inputs = dc.LossInputs(source, embed((source + 1) / 2), torch.ones(5), l1_weight=0.3)
    loss, terms = dc.diffusion_clip_loss(edited, embed, inputs)
    assert float(terms["l1"]) == pytest.approx(0.5)
    assert float(loss) == pytest.approx(float(terms["direction"]) + 0.3 * 0.5)


def test_the_log_form_is_the_reference_codes_minus_log_of_half_one_plus_cos():
    cosines = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0], dtype=torch.float64)
    expected = -torch.log((1 + cosines) / 2)
    logs = dc.log_direction_loss(1 - cosines)
    torch.testing.assert_close(logs[:4], expected[:4])
    assert float(logs[0]) == 0.0 and torch.isfinite(logs[4])
    # Its gradient is eq. 9's times 1 / (1 + cos): the images that moved least weigh most.
    losses = (1 - cosines[1:4]).clone().requires_grad_(True)
    dc.log_direction_loss(losses).sum().backward()
    torch.testing.assert_close(losses.grad, 1 / (1 + cosines[1:4]))


def test_the_log_form_trains_on_the_mean_of_per_image_logs_and_reports_eq_9():
    generator = torch.Generator().manual_seed(3)
    source = torch.tanh(torch.randn(3, 3, 4, 4, generator=generator))
    edited = torch.tanh(torch.randn(3, 3, 4, 4, generator=generator))
    projection = torch.randn(48, 6, generator=generator)
    embed = lambda images: torch.nn.functional.normalize(images.flatten(1) @ projection, dim=-1)  # noqa: E731
    text = torch.randn(6, generator=generator)
    inputs = dc.LossInputs(source, embed((source + 1) / 2), text, l1_weight=0.3, direction_form="log")
    loss, terms = dc.diffusion_clip_loss(edited, embed, inputs)
    per_image = dc.direction_loss(embed((edited + 1) / 2), inputs.source_embeddings, text)
    l1 = (edited - source).abs().mean()
    torch.testing.assert_close(loss, (-torch.log(1 - per_image / 2)).mean() + 0.3 * l1)
    torch.testing.assert_close(terms["direction"], per_image.mean())
    cosine_loss, _ = dc.diffusion_clip_loss(
        edited, embed, dataclasses.replace(inputs, direction_form="cosine")
    )
    torch.testing.assert_close(cosine_loss, per_image.mean() + 0.3 * l1)


def test_a_floor_stops_the_direction_loss_pushing_images_already_past_it():
    generator = torch.Generator().manual_seed(4)
    source = torch.tanh(torch.randn(4, 3, 4, 4, generator=generator))
    edited = torch.tanh(torch.randn(4, 3, 4, 4, generator=generator)).requires_grad_(True)
    projection = torch.randn(48, 6, generator=generator)
    embed = lambda images: torch.nn.functional.normalize(images.flatten(1) @ projection, dim=-1)  # noqa: E731
    text = torch.randn(6, generator=generator)
    inputs = dc.LossInputs(source, embed((source + 1) / 2), text, l1_weight=0.0)
    per_image = dc.direction_loss(embed((edited + 1) / 2), inputs.source_embeddings, text).detach()
    floor = float(per_image.median())
    for form, of in (("cosine", lambda x: x), ("log", dc.log_direction_loss)):
        floored = dataclasses.replace(inputs, direction_floor=floor, direction_form=form)
        loss, terms = dc.diffusion_clip_loss(edited, embed, floored)
        torch.testing.assert_close(loss, of((per_image - floor).clamp_min(0)).mean())
        torch.testing.assert_close(terms["direction"], per_image.mean())  # eq. 9 reported as it is
    edited.grad = None
    loss.backward()
    below = per_image <= floor
    assert bool(below.any()) and bool((edited.grad[below] == 0).all())
    assert bool((edited.grad[~below].abs().sum((1, 2, 3)) > 0).all())


@pytest.fixture(scope="module")
def trainable(tiny_sd):
    """A float64 copy of the tiny UNet with gradients, a scheduler whose clean end is alpha = 1, and
    a differentiable toy image embedding."""
    unet = copy.deepcopy(tiny_sd.unet).double().requires_grad_(True)
    scheduler = DDIMScheduler.from_config(tiny_sd.scheduler.config, set_alpha_to_one=True)
    condition = encode_prompts(tiny_sd.tokenizer, tiny_sd.text_encoder, [""]).double()
    projection = torch.randn(3 * 8 * 8, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def noise_fn(latents, timestep):
        return unet(latents, timestep, encoder_hidden_states=condition.expand(len(latents), -1, -1)).sample

    def decode(latents):  # a smooth differentiable "decoder" to 3 x 8 x 8 images in [-1, 1]
        return torch.tanh(latents[:, :3])

    def embed(images):
        return torch.nn.functional.normalize(images.flatten(1) @ projection, dim=-1)

    return unet, scheduler, noise_fn, decode, embed


def _loss_inputs(embed, generator):
    source_images = torch.tanh(torch.randn(2, 3, 8, 8, generator=generator, dtype=torch.float64))
    return dc.LossInputs(
        source_images=source_images,
        source_embeddings=embed((source_images + 1) / 2),
        text_direction=torch.randn(16, generator=generator, dtype=torch.float64),
    )


def _inputs_and_start(embed, seed: int):
    """(the generator, drawn on further by a test; the loss inputs; x_t0 (2, 4, 8, 8)) from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    inputs = _loss_inputs(embed, generator)
    return generator, inputs, torch.randn(2, 4, 8, 8, generator=generator, dtype=torch.float64)


def _gradients(unet, loss):
    unet.zero_grad()
    loss.backward()
    return [parameter.grad.clone() for parameter in unet.parameters()]


def test_memory_efficient_and_full_backprop_gradients_agree_for_one_generative_step(trainable):
    """With S_gen = 1 and alpha_bar = 1 at the clean end, x^0 = f_theta(x_t0, t0): the two variants
    differentiate the same loss."""
    unet, scheduler, noise_fn, decode, embed = trainable
    generator, inputs, start = _inputs_and_start(embed, seed=3)
    grid = dc.ReturnGrid.from_scheduler(scheduler, 400, 1)
    full, _ = dc.full_backprop_loss(noise_fn, grid, start, decode, embed, inputs)
    full_gradients = _gradients(unet, full)
    (efficient, _), *rest = list(dc.memory_efficient_losses(noise_fn, grid, start, decode, embed, inputs))
    assert rest == []
    for expected, actual in zip(full_gradients, _gradients(unet, efficient), strict=True):
        torch.testing.assert_close(actual, expected)
    torch.testing.assert_close(efficient, full)


def test_memory_efficient_losses_reach_the_weights_through_one_unet_call_each(trainable):
    """Each step's loss is that of DEC(f_theta(x_t, t)) at the step's own x_t, which is detached: its
    gradient equals the gradient of a one-step loss taken on that x_t alone."""
    unet, scheduler, noise_fn, decode, embed = trainable
    generator, inputs, start = _inputs_and_start(embed, seed=4)
    grid = dc.ReturnGrid.from_scheduler(scheduler, 400, 3)
    steps = dc.memory_efficient_losses(noise_fn, grid, start, decode, embed, inputs)
    next(steps)
    second, _ = next(steps)
    with torch.no_grad():  # x at level 2, by one step of eq. 13 from x_t0
        level_two = dc.ddim_move(noise_fn(start, int(grid.timesteps[3])), start, grid.alpha(3), grid.alpha(2))
    reference = dc.predict_clean(noise_fn(level_two, int(grid.timesteps[2])), level_two, grid.alpha(2))
    expected, _ = dc.diffusion_clip_loss(decode(reference), embed, inputs)
    for want, got in zip(_gradients(unet, expected), _gradients(unet, second), strict=True):
        torch.testing.assert_close(got, want)
    assert len(list(steps)) == 1


def test_full_backprop_reaches_every_generative_step(trainable):
    """Full backprop differs from the truncated chain when S_gen > 1 (the gradient flows through x_t)."""
    unet, scheduler, noise_fn, decode, embed = trainable
    generator, inputs, start = _inputs_and_start(embed, seed=5)
    grid = dc.ReturnGrid.from_scheduler(scheduler, 400, 2)
    full, _ = dc.full_backprop_loss(noise_fn, grid, start, decode, embed, inputs)
    with torch.no_grad():
        first = dc.ddim_move(noise_fn(start, int(grid.timesteps[2])), start, grid.alpha(2), grid.alpha(1))
    truncated, _ = dc.diffusion_clip_loss(
        decode(dc.generate(noise_fn, dc.ReturnGrid(grid.timesteps[:2], grid.alphas[:2]), first)),
        embed,
        inputs,
    )
    torch.testing.assert_close(truncated, full)  # same value ...
    full_gradient, truncated_gradient = _gradients(unet, full), _gradients(unet, truncated)
    difference = sum(
        float((a - b).abs().sum()) for a, b in zip(full_gradient, truncated_gradient, strict=True)
    )
    assert difference > 1e-8  # ... but the full chain adds the gradient through the first step


def test_noise_combination_with_one_model_at_gamma_one_is_that_model():
    base, editor = _constant_noise(torch.zeros(1, 4, 2, 2)), lambda x, t: x * 2 + t
    latents = torch.randn(2, 4, 2, 2)
    combined = dc.combined_noise_fn([base, editor], dc.constant_gammas((0.0, 1.0)))
    torch.testing.assert_close(combined(latents, 7), editor(latents, 7))
    original = dc.combined_noise_fn([base, editor], dc.transition_gammas(0.0))
    torch.testing.assert_close(original(latents, 7), base(latents, 7))


def test_generation_with_combined_noise_is_eq_14(tiny_sd):
    """Eq. 14 written out: x_{t-1} = sqrt(a') sum_i gamma_i f_i + sqrt(1 - a') sum_i gamma_i eps_i."""
    grid = dc.ReturnGrid.from_scheduler(tiny_sd.scheduler, 500, 4)
    models = [lambda x, t: torch.sin(x) * t / 500, lambda x, t: x * 0.3, lambda x, t: torch.cos(x)]
    weights_at = lambda t: (0.2, 0.5, 0.3) if t > 250 else (0.6, 0.1, 0.3)  # noqa: E731
    start = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    latents = start
    for level in range(grid.num_steps, 0, -1):
        t, a, a_next = int(grid.timesteps[level]), grid.alpha(level), grid.alpha(level - 1)
        weights = weights_at(t)
        noises = [model(latents, t) for model in models]
        cleans = [(latents - (1 - a) ** 0.5 * noise) / a**0.5 for noise in noises]
        latents = a_next**0.5 * sum(w * f for w, f in zip(weights, cleans, strict=True)) + (
            1 - a_next
        ) ** 0.5 * sum(w * e for w, e in zip(weights, noises, strict=True))
    torch.testing.assert_close(dc.generate(dc.combined_noise_fn(models, weights_at), grid, start), latents)


def test_windowed_weights_give_each_editor_its_gamma_inside_its_window_and_the_rest_to_the_original():
    schedule = dc.windowed_gammas(
        (1.0, 0.7, 0.3), ((250, 10**6), (0, 249), (100, 149)), num_train_timesteps=1000
    )
    assert tuple(schedule(999)) == (0.0, 1.0, 0.0, 0.0)  # a high beyond T - 1 runs to the last step
    assert tuple(schedule(250)) == (0.0, 1.0, 0.0, 0.0)
    assert tuple(schedule(249)) == (0.30000000000000004, 0.0, 0.7, 0.0)  # 1 - 0.7 in float64
    assert tuple(schedule(149)) == (0.0, 0.0, 0.7, 0.3)
    # 0.6 + 0.3 + 0.1 sums to 1 - 1.1e-16 in float64: the original model gets 0, not an extra UNet call.
    assert dc.windowed_gammas((0.6, 0.3, 0.1), (dc.ALL_STEPS,) * 3)(5)[0] == 0.0
    assert tuple(schedule(100)) == (0.0, 0.0, 0.7, 0.3)
    assert tuple(schedule(99)) == (0.30000000000000004, 0.0, 0.7, 0.0)
    assert tuple(schedule(0)) == (0.30000000000000004, 0.0, 0.7, 0.0)
    every_step = dc.windowed_gammas((0.25,), (dc.ALL_STEPS,))
    assert all(tuple(every_step(t)) == tuple(dc.transition_gammas(0.25)(t)) for t in (0, 500, 999))


def test_windowed_weights_refuse_overlaps_above_one_and_bad_windows():
    with pytest.raises(ValueError, match=r"the editors active at t=200 weigh 1\.2 together"):
        dc.windowed_gammas((0.6, 0.6), ((200, 999), (0, 200)))
    with pytest.raises(ValueError, match="t=300 weigh 1.01"):
        dc.windowed_gammas((0.51, 0.5), ((300, 999), (0, 300)))
    dc.windowed_gammas((0.6, 0.6), ((201, 999), (0, 200)))  # touching windows do not overlap
    with pytest.raises(ValueError, match="one window per editor"):
        dc.windowed_gammas((0.5,), ())
    with pytest.raises(ValueError, match=r"gammas \[1\.5\] must each lie in \[0, 1\]"):
        dc.windowed_gammas((1.5,), (dc.ALL_STEPS,))
    for window in ((300, 200), (-1, 10), (1000, 1200)):
        with pytest.raises(ValueError, match="must satisfy 0 <= low <= high, low < 1000"):
            dc.windowed_gammas((0.5,), (window,))


def test_a_conjunction_adds_each_editors_change_from_the_original_in_full():
    """eps_theta + sum_i gamma_i(t) (eps_i - eps_theta), computed directly, against the schedule's weights
    over (original, editors): the original's share goes negative and windows still apply."""
    base, first, second = (
        (lambda x, t: x * 0.1),
        (lambda x, t: torch.sin(x)),
        (lambda x, t: torch.cos(x) * t / 500),
    )
    schedule = dc.windowed_gammas((1.0, 0.7), (dc.ALL_STEPS, (0, 249)), combination="conjunction")
    assert tuple(schedule(100)) == pytest.approx((-0.7, 1.0, 0.7))
    assert tuple(schedule(300)) == (0.0, 1.0, 0.0)  # 1 - 1 exactly: no UNet call of the original
    combined = dc.combined_noise_fn([base, first, second], schedule)
    latents = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    for timestep, second_weight in ((100, 0.7), (300, 0.0)):
        expected = base(latents, timestep) + 1.0 * (first(latents, timestep) - base(latents, timestep))
        expected = expected + second_weight * (second(latents, timestep) - base(latents, timestep))
        torch.testing.assert_close(combined(latents, timestep), expected)


def test_a_conjunction_takes_any_weights_at_or_above_zero_and_convex_stays_the_default():
    assert tuple(dc.windowed_gammas((1.5, 1.0), (dc.ALL_STEPS,) * 2, combination="conjunction")(0)) == (
        -1.5,
        1.5,
        1.0,
    )
    with pytest.raises(ValueError, match="weigh 2 together"):
        dc.windowed_gammas((1.0, 1.0), (dc.ALL_STEPS,) * 2)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite and >= 0"):
            dc.windowed_gammas((bad,), (dc.ALL_STEPS,), combination="conjunction")
    with pytest.raises(ValueError, match=r"must be one of \['convex', 'conjunction'\]"):
        dc.windowed_gammas((0.5,), (dc.ALL_STEPS,), combination="sum")


def test_a_windowed_generation_hands_over_from_one_editor_to_the_other(tiny_sd):
    """Editor 1 on the steps with t >= 250, editor 2 below: the same as generating with editor 1 down to
    the handover level and continuing from there with editor 2 alone."""
    grid = dc.ReturnGrid.from_scheduler(tiny_sd.scheduler, 500, 6)
    base, first, second = (
        (lambda x, t: x * 0.1),
        (lambda x, t: torch.sin(x)),
        (lambda x, t: torch.cos(x) * t / 500),
    )
    start = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    schedule = dc.windowed_gammas((1.0, 1.0), ((250, 999), (0, 249)))
    windowed = dc.generate(dc.combined_noise_fn([base, first, second], schedule), grid, start)
    handover = next(level for level in range(grid.num_steps, 0, -1) if int(grid.timesteps[level]) < 250)
    assert 1 < handover < grid.num_steps  # both editors take steps
    latents = start
    for level in range(grid.num_steps, 0, -1):
        model = first if level > handover else second
        a, a_next = grid.alpha(level), grid.alpha(level - 1)
        noise = model(latents, int(grid.timesteps[level]))
        clean = (latents - (1 - a) ** 0.5 * noise) / a**0.5
        latents = a_next**0.5 * clean + (1 - a_next) ** 0.5 * noise
    torch.testing.assert_close(windowed, latents)


def test_noise_combination_refuses_weights_that_do_not_sum_to_one():
    with pytest.raises(ValueError, match="sum"):
        dc.combined_noise([torch.zeros(1), torch.ones(1)], [0.5, 0.6])
    with pytest.raises(ValueError, match="one gamma per model"):
        dc.combined_noise([torch.zeros(1)], [0.5, 0.5])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        dc.transition_gammas(1.5)


def test_each_step_evaluates_the_noise_at_the_level_it_leaves(tiny_sd):
    """Eq. 12 evaluates eps_theta(x_t, t) at the lower level of each step, eq. 13 at the upper one."""
    grid = dc.ReturnGrid.from_scheduler(tiny_sd.scheduler, 300, 3)
    seen = []

    def recording(latents, timestep):
        seen.append(timestep)
        return torch.zeros_like(latents)

    dc.forward(recording, grid, torch.zeros(1, 4, 2, 2))
    assert seen == [0, 100, 200]
    seen.clear()
    dc.generate(recording, grid, torch.zeros(1, 4, 2, 2))
    assert seen == [300, 200, 100]


def test_return_grid_bounds_levels_and_precision(tiny_sd):
    """t0 in [1, T - 1] and S in [1, t0], both ends included; levels round(k t0 / S); alphas in float64."""
    scheduler = tiny_sd.scheduler
    last = scheduler.config.num_train_timesteps - 1
    assert dc.ReturnGrid.from_scheduler(scheduler, 1, 1).timesteps.tolist() == [0, 1]
    assert dc.ReturnGrid.from_scheduler(scheduler, last, 3).return_step == last
    assert dc.ReturnGrid.from_scheduler(scheduler, 5, 5).timesteps.tolist() == [0, 1, 2, 3, 4, 5]
    grid = dc.ReturnGrid.from_scheduler(scheduler, 7, 3)
    assert grid.timesteps.tolist() == [0, 2, 5, 7] and grid.alphas.dtype == torch.float64
    with pytest.raises(ValueError, match=rf"t0={last + 1} must be in \[1, {last}\]"):
        dc.ReturnGrid.from_scheduler(scheduler, last + 1, 3)


def test_identity_loss_is_the_mean_absolute_difference_of_each_image():
    edited = torch.zeros(2, 3, 2, 2)
    source = torch.zeros(2, 3, 2, 2)
    source[0, 0, 0, 0] = 1.2  # image 0: one of 12 values off by 1.2
    edited[1], source[1] = 0.25, -0.25  # image 1: every value off by 0.5
    assert torch.allclose(dc.identity_loss(edited, source), torch.tensor([0.1, 0.5]))


def test_the_clip_loss_embeds_the_edit_mapped_to_zero_one_and_clamped():
    seen = []

    def embed(images):
        seen.append(images)
        return torch.nn.functional.normalize(images.flatten(1)[:, :2] + 1.0, dim=-1)

    edited = torch.tensor([-1.5, -1.0, 0.0, 0.5, 1.5]).view(1, 5, 1, 1).expand(1, 5, 1, 1)
    inputs = dc.LossInputs(
        source_images=torch.zeros_like(edited),
        source_embeddings=torch.nn.functional.normalize(torch.ones(1, 2), dim=-1),
        text_direction=torch.tensor([1.0, 0.0]),
    )
    dc.diffusion_clip_loss(edited, embed, inputs)
    assert torch.equal(seen[0].flatten(), torch.tensor([0.0, 0.0, 0.5, 0.75, 1.0]))


def test_transition_weights_run_from_the_original_model_to_the_editor():
    assert tuple(dc.transition_gammas(0.25)(500)) == (0.75, 0.25)
    assert tuple(dc.transition_gammas(1.0)(500)) == (0.0, 1.0)
    assert tuple(dc.transition_gammas(0.0)(500)) == (1.0, 0.0)
    with pytest.raises(ValueError, match="must be in"):
        dc.transition_gammas(1.5)


def test_a_combined_noise_schedule_names_what_is_wrong_with_its_weights():
    noise = _constant_noise(torch.ones(1))
    latents = torch.zeros(1)
    with pytest.raises(ValueError, match=r"gamma schedule gave 1 weights for 2 models"):
        dc.combined_noise_fn([noise, noise], dc.constant_gammas((1.0,)))(latents, 10)
    with pytest.raises(ValueError, match=r"gammas \[0\.5, 0\.2\] at t=10 must sum to 1 \(eq\. 14\)"):
        dc.combined_noise_fn([noise, noise], dc.constant_gammas((0.5, 0.2)))(latents, 10)
    with pytest.raises(ValueError, match=r"gammas \[0\.0, 0\.0\] at t=10 must sum to 1"):
        dc.combined_noise_fn([noise, noise], dc.constant_gammas((0.0, 0.0)))(latents, 10)


def test_kept_directions_leave_the_least_squares_residual_of_the_text_directions():
    generator = torch.Generator().manual_seed(3)
    text = torch.randn(5, 8, generator=generator)
    kept = torch.randn(3, 8, generator=generator)
    # The residual of the least-squares fit of ΔT by the kept directions: an independent statement of
    # the projection on the orthogonal complement of their span.
    coefficients = torch.linalg.lstsq(kept.T.double(), text.T.double()).solution
    residual = (text.double() - (kept.T.double() @ coefficients).T).float()
    projected = dc.without_kept_directions(text, kept)
    torch.testing.assert_close(projected, residual, atol=1e-5, rtol=0)
    torch.testing.assert_close(projected @ kept.T, torch.zeros(5, 3), atol=1e-5, rtol=0)
    # A kept set with a dependent row spans the same space and removes the same components.
    dependent = torch.cat([kept, kept[:1] + 2 * kept[1:2]])
    torch.testing.assert_close(dc.without_kept_directions(text, dependent), residual, atol=1e-5, rtol=0)
    # Directions already orthogonal to the kept ones are left as they are; nothing kept changes nothing.
    torch.testing.assert_close(dc.without_kept_directions(projected, kept), projected, atol=1e-5, rtol=0)
    assert torch.equal(dc.without_kept_directions(text, torch.zeros(0, 8)), text)
    # A kept direction of zero length (a pair of identical texts) spans nothing and removes nothing.
    torch.testing.assert_close(dc.without_kept_directions(text, torch.zeros(2, 8)), text)


def test_views_shift_with_reflected_borders_and_mirror_view_major():
    import numpy as np

    generator = torch.Generator().manual_seed(4)
    images = torch.rand(2, 3, 9, 11, generator=generator)
    views = [
        dc.View(dx=2, dy=-1, flip=False),
        dc.View(dx=0, dy=0, flip=True),
        dc.View(dx=-3, dy=2, flip=True),
        dc.View(dx=1, dy=-4, flip=False),
    ]
    out = dc.apply_views(images, views)
    assert out.shape == (8, 3, 9, 11)
    # numpy's reflect padding and a crop: out[..., y, x] = image[..., y - dy, x - dx]
    padded = np.pad(images.numpy(), ((0, 0), (0, 0), (4, 4), (4, 4)), mode="reflect")
    for index, view in enumerate(views):
        crop = padded[:, :, 4 - view.dy : 4 - view.dy + 9, 4 - view.dx : 4 - view.dx + 11]
        expected = torch.as_tensor(crop[..., ::-1].copy() if view.flip else crop)
        torch.testing.assert_close(out[index * 2 : index * 2 + 2], expected)
    torch.testing.assert_close(out[0, :, :-1, 2:], images[0, :, 1:, :-2])  # dy = -1, dx = 2 inside
    assert torch.equal(dc.apply_views(images, [dc.View(0, 0, False)]), images)
    source = images.clone().requires_grad_(True)
    dc.apply_views(source, views).sum().backward()
    assert source.grad is not None and source.grad.abs().sum() > 0


def test_random_views_are_seeded_bounded_and_mirror_both_ways():
    views = dc.random_views(64, 3, torch.Generator().manual_seed(0))
    assert views == dc.random_views(64, 3, torch.Generator().manual_seed(0))
    assert views != dc.random_views(64, 3, torch.Generator().manual_seed(1))
    shifts = {shift for view in views for shift in (view.dx, view.dy)}
    assert shifts == set(range(-3, 4))
    assert {view.flip for view in views} == {True, False}


def test_an_ensembles_direction_loss_is_the_mean_of_each_clips_own():
    generator = torch.Generator().manual_seed(0)
    narrow_sources, narrow_edits, narrow_texts = F.normalize(
        torch.randn(3, 4, 3, generator=generator), dim=-1
    )
    wide_sources, wide_edits, wide_texts = F.normalize(torch.randn(3, 4, 5, generator=generator), dim=-1)
    stacked = dc.direction_loss(
        dc.member_rows([narrow_edits, wide_edits]),
        dc.member_rows([narrow_sources, wide_sources]),
        dc.member_rows([narrow_texts, wide_texts]),
    )
    narrow = dc.direction_loss(narrow_edits, narrow_sources, narrow_texts)
    wide = dc.direction_loss(wide_edits, wide_sources, wide_texts)
    # member-major rows, each the member's own L_direction; the batch mean weighs the members equally
    torch.testing.assert_close(stacked, torch.cat([narrow, wide]))
    torch.testing.assert_close(stacked.mean(), (narrow.mean() + wide.mean()) / 2)
    assert dc.member_rows([narrow_edits, wide_edits]).shape == (8, 5)


def test_an_ensembles_embedding_is_each_clips_embedding_of_the_same_images_member_major():
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))

    def narrow(batch: torch.Tensor) -> torch.Tensor:  # (B, 3)
        return F.normalize(batch.mean(dim=(2, 3)), dim=-1)

    def wide(batch: torch.Tensor) -> torch.Tensor:  # (B, 5)
        return F.normalize(batch.flatten(1)[:, :5], dim=-1)

    embedded = dc.ensemble_embed([narrow, wide])(images)
    torch.testing.assert_close(embedded[:2, :3], narrow(images))
    torch.testing.assert_close(embedded[:2, 3:], torch.zeros(2, 2))
    torch.testing.assert_close(embedded[2:], wide(images))
    torch.testing.assert_close(dc.ensemble_embed([wide])(images), wide(images))


def test_the_prior_gradient_in_the_latent_is_the_frozen_models_noise_residual_over_its_size():
    """Score distillation: d L_prior / d z = (eps_frozen(sqrt(a) z + sqrt(1 - a) eps, t) - eps) / numel,
    with no gradient through the frozen model."""
    generator = torch.Generator().manual_seed(6)
    frozen = torch.nn.Conv2d(4, 4, 3, padding=1).double()
    latents = torch.randn(2, 4, 8, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    noise = torch.randn(2, 4, 8, 8, generator=generator, dtype=torch.float64)
    calls = []

    def frozen_noise(noisy, timestep):
        calls.append((timestep, noisy.requires_grad))
        return frozen(noisy) * timestep / 100

    prior = dc.PriorTerm(noise_fn=frozen_noise, timestep=70, alpha=0.64, noise=noise, weight=2.0)
    dc.prior_loss(latents, prior).sum().backward()
    with torch.no_grad():
        residual = frozen(0.8 * latents + 0.6 * noise) * 0.7 - noise
    torch.testing.assert_close(latents.grad, residual / (4 * 8 * 8))
    assert calls == [(70, False)] and frozen.weight.grad is None


def test_guidance_mixes_the_two_noise_functions_and_w_1_calls_only_the_conditional():
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    calls = []

    def conditional(noisy, timestep):
        calls.append("conditional")
        return torch.sin(noisy) * timestep

    def unconditional(noisy, timestep):
        calls.append("unconditional")
        return noisy**2

    torch.testing.assert_close(
        dc.guided(conditional, unconditional, 3.0)(latents, 5),
        latents**2 + 3.0 * (torch.sin(latents) * 5 - latents**2),
    )
    torch.testing.assert_close(dc.guided(conditional, unconditional, 0.0)(latents, 5), latents**2)
    calls.clear()
    assert dc.guided(conditional, unconditional, 1.0) is conditional
    dc.guided(conditional, unconditional, 1.0)(latents, 5)
    assert calls == ["conditional"]


def test_the_delta_prior_gradient_is_the_target_noise_minus_the_sources_reference_noise():
    """Delta Denoising Score: d L / d z = (eps~(sqrt(a) z + sqrt(1 - a) eps; y_tar) - eps~(sqrt(a) zs
    + sqrt(1 - a) eps; y_ref)) / numel, the same (t, eps) on both sides."""
    generator = torch.Generator().manual_seed(8)
    frozen = torch.nn.Conv2d(4, 4, 3, padding=1).double()
    latents = torch.randn(2, 4, 8, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    sources = torch.randn(2, 4, 8, 8, generator=generator, dtype=torch.float64)
    noise = torch.randn(2, 4, 8, 8, generator=generator, dtype=torch.float64)

    def target(noisy, timestep):
        return frozen(noisy) + 0.3

    def reference(noisy, timestep):
        return frozen(noisy) * timestep / 100

    prior = dc.PriorTerm(
        noise_fn=target,
        timestep=40,
        alpha=0.36,
        noise=noise,
        weight=1.0,
        reference=dc.PriorReference(noise_fn=reference, latents=sources),
    )
    dc.prior_loss(latents, prior).sum().backward()
    with torch.no_grad():
        residual = frozen(0.6 * latents + 0.8 * noise) + 0.3 - frozen(0.6 * sources + 0.8 * noise) * 0.4
    torch.testing.assert_close(latents.grad, residual / (4 * 8 * 8))
    assert frozen.weight.grad is None
    # At the source, with the same condition on both sides, there is nothing to move.
    at_source = sources.clone().requires_grad_(True)
    same = dataclasses.replace(prior, noise_fn=reference)
    dc.prior_loss(at_source, same).sum().backward()
    assert not at_source.grad.any()


def test_full_backprop_adds_the_weighted_prior_on_the_generated_latents(trainable):
    unet, scheduler, noise_fn, decode, embed = trainable
    generator, inputs, start = _inputs_and_start(embed, seed=7)
    grid = dc.ReturnGrid.from_scheduler(scheduler, 400, 2)
    noise = torch.randn(2, 4, 8, 8, generator=generator, dtype=torch.float64)
    prior = dc.PriorTerm(
        noise_fn=lambda latents, t: torch.tanh(latents), timestep=100, alpha=0.5, noise=noise, weight=3.0
    )
    with_prior, terms = dc.full_backprop_loss(noise_fn, grid, start, decode, embed, inputs, prior=prior)
    plain, plain_terms = dc.full_backprop_loss(noise_fn, grid, start, decode, embed, inputs)
    latents = dc.generate(noise_fn, grid, start)
    torch.testing.assert_close(with_prior, plain + 3.0 * dc.prior_loss(latents, prior).mean())
    assert terms.keys() == plain_terms.keys()
    gradients = _gradients(unet, with_prior)
    assert any(
        float((a - b).abs().sum()) > 1e-10 for a, b in zip(gradients, _gradients(unet, plain), strict=True)
    )
