"""Stochastic null-text embeddings (§3.1): eq. 1 against a second implementation, sampling, batching
and the edits the samples give."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from pipeline.diffusion.errors import EngineInputError
from pipeline.diffusion.sampling import predict_noise, sample
from pipeline.engine import AttentionControl, EditRequest, InversionConfig, edit, invert
from pipeline.methods.null_text_vae import (
    EmbeddingVAE,
    cyclical_beta,
    kl_divergence,
    timestep_embedding,
)

STEPS = 3
SOURCE = "a red circle on a white background"
TARGET = "a red square on a white background"
# Small sizes keep the tests fast; alpha != 1 and a large beta make both terms of eq. 1 visible.
SETTINGS = dict(
    num_steps=STEPS,
    guidance_scale=7.5,
    inner_steps=2,
    epochs=4,
    latent_dim=4,
    hidden_dim=16,
    reduced_channels=2,
    alpha=2.0,
    beta=0.5,
    kl_cycles=2,
    vae_learning_rate=1e-2,
    seed=3,
    # The re-derivations below follow null-text's path and the plain decoder; the defaults (the VAE's own
    # sampled path, the residual decoder) have their own tests.
    training_path="null_text",
    decoder_base="mean",
)


def _config(**changes) -> InversionConfig:
    return InversionConfig.of("null_text_vae", **{**SETTINGS, **changes})


@pytest.fixture(scope="module")
def inverted(tiny_sd, images):
    return invert(tiny_sd, images[:2], [SOURCE, SOURCE], _config())


def _reference_decode(vae: EmbeddingVAE, image: int, phi: torch.Tensor, timestep: int, noise, temperature):
    """Encoder and decoder of one image written out with F.linear on that image's weight slices."""

    def layer(x, name):
        weight, bias = getattr(vae, f"{name}_weight")[image], getattr(vae, f"{name}_bias")[image]
        return F.linear(x, weight.T, bias)

    reduced = layer(phi, "reduce")  # (L, r)
    half = 16
    frequencies = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(half) / half)
    angles = timestep * frequencies
    features = torch.cat([reduced.reshape(-1), torch.cos(angles), torch.sin(angles)])
    hidden = F.silu(layer(features, "encode"))
    mu, logvar = layer(hidden, "mu"), layer(hidden, "logvar")
    latent = mu + temperature * torch.exp(0.5 * logvar) * noise
    flat = layer(F.silu(layer(latent, "decode")), "unflatten")
    base = phi if vae.add_input else vae.base[image]
    phi_prime = base + layer(flat.view(phi.shape[0], -1), "expand")
    return phi_prime, mu, logvar


def test_kl_matches_the_closed_form_of_torch_distributions():
    generator = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(5, 7, generator=generator), torch.randn(5, 7, generator=generator)
    posterior = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    prior = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    expected = torch.distributions.kl_divergence(posterior, prior).sum(dim=-1)
    torch.testing.assert_close(kl_divergence(mu, logvar), expected)


def test_cyclical_beta_rises_over_the_ramp_of_each_cycle_then_holds():
    # Fu et al.: total T iterations, M cycles, ratio R: beta_k = beta * min(1, (k mod (T/M)) / (T/M) / R).
    total, cycles, ramp, beta = 12, 3, 0.5, 2.0
    period = total / cycles
    expected = [beta * min(1.0, (k % period) / (period * ramp)) for k in range(total)]
    assert [cyclical_beta(k, total, beta, cycles, ramp) for k in range(total)] == pytest.approx(expected)
    assert expected[:4] == [0.0, 1.0, 2.0, 2.0]  # the formula above, read at one cycle


def test_timestep_embedding_is_sinusoidal():
    embedded = timestep_embedding(torch.tensor([0, 500]))
    assert embedded.shape == (2, 32)
    torch.testing.assert_close(embedded[0], torch.cat([torch.ones(16), torch.zeros(16)]))
    torch.testing.assert_close(embedded[1, 0], torch.cos(torch.tensor(500.0)))


@pytest.mark.parametrize("decoder_base", ["mean", "input"])
def test_first_iteration_loss_is_eq_1_written_out(tiny_sd, images, decoder_base):
    """Re-derive iteration 0 from the seed: initial weights, the step drawn, the noise, the null-text
    reconstruction path and the guided step, all through a second implementation."""
    inversion = invert(tiny_sd, images[:2], [SOURCE, SOURCE], _config(decoder_base=decoder_base))
    hook, latents, schedule = inversion.latents.edit_hook, inversion.latents, inversion.schedule
    params = inversion.config.method_params
    null_text = hook.null_text
    generator = torch.Generator().manual_seed(params.seed)
    base = torch.zeros_like(null_text[0]) if decoder_base == "input" else null_text.mean(dim=0)
    initial = EmbeddingVAE(2, *null_text.shape[2:], params, base, generator, decoder_base == "input")
    step_index = torch.randperm(STEPS, generator=generator).tolist()[0]
    noise = torch.randn(1, params.latent_dim, generator=generator)[0]
    path = []
    sample(
        tiny_sd.unet,
        schedule,
        latents.trajectory[-1],
        latents.cond_embeddings,
        latents.uncond_embeddings,
        7.5,
        after_step=lambda i, z: path.append(z.clone()) or z,
    )
    start = ([latents.trajectory[-1]] + path)[step_index]
    timestep = int(schedule.timesteps[step_index])
    cond = latents.cond_embeddings[0]
    for image in range(2):
        phi_prime, mu, logvar = _reference_decode(
            initial, image, null_text[step_index, image], timestep, noise, 1.0
        )
        with torch.no_grad():
            eps = predict_noise(
                tiny_sd.unet,
                start[image : image + 1],
                timestep,
                cond[image : image + 1],
                phi_prime[None],
                7.5,
            )
            landed = schedule.step(eps, timestep, start[image : image + 1])
        reconstruction = (landed - latents.trajectory[STEPS - step_index - 1][image]).pow(2).mean()
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum()
        assert hook.history.step_index[0] == step_index
        torch.testing.assert_close(
            hook.history.reconstruction[0, image], reconstruction, rtol=1e-4, atol=1e-9
        )
        torch.testing.assert_close(hook.history.kl[0, image], kl.detach(), rtol=1e-4, atol=1e-7)
    # Every iteration's loss is alpha * L_rec + beta_k * L_reg with Fu et al.'s beta_k.
    total = params.epochs * STEPS
    betas = torch.tensor(
        [params.beta * min(1.0, (k % (total / 2)) / (total / 2 * 0.5)) for k in range(total)]
    )[:, None]
    history = hook.history
    assert history.beta == pytest.approx(betas.flatten().tolist())
    torch.testing.assert_close(history.loss, 2.0 * history.reconstruction + betas * history.kl)
    assert (betas > 0).any() and (history.kl > 0).all()


def test_temperature_zero_samples_the_mean_decode(inverted):
    hook = inverted.latents.edit_hook
    params = inverted.config.method_params
    first, second = hook.sample_embeddings(1, 11, 0.0), hook.sample_embeddings(1, 12, 0.0)
    assert torch.equal(first, second)
    for step in range(STEPS):
        timestep = int(inverted.schedule.timesteps[step])
        expected, _, _ = _reference_decode(
            hook.vae, 1, hook.null_text[step, 1], timestep, torch.zeros(params.latent_dim), 0.0
        )
        torch.testing.assert_close(first[step], expected.detach(), rtol=1e-5, atol=1e-6)
    # At temperature 1 the seeds give different sequences, and one seed always the same one.
    assert not torch.allclose(hook.sample_embeddings(1, 11, 1.0), hook.sample_embeddings(1, 12, 1.0))
    assert torch.equal(hook.sample_embeddings(1, 11, 1.0), hook.sample_embeddings(1, 11, 1.0))


def test_untrained_input_decoder_samples_null_texts_embeddings(tiny_sd, images):
    """With the VAE left at its initial weights (lr 0) D is zero: `decoder_base: input` samples phi_t
    itself at any temperature, so its sampled edits are null-text's; `mean` samples phi_bar."""
    frozen = {"vae_learning_rate": 0.0, "epochs": 1}
    residual = invert(tiny_sd, images[:2], [SOURCE, SOURCE], _config(decoder_base="input", **frozen))
    plain = invert(tiny_sd, images[:2], [SOURCE, SOURCE], _config(**frozen))
    null_text = residual.latents.edit_hook.null_text
    for image in range(2):
        assert torch.equal(residual.latents.edit_hook.sample_embeddings(image, 7, 2.0), null_text[:, image])
        mean = null_text[:, image].mean(dim=0).expand_as(null_text[:, image])
        torch.testing.assert_close(plain.latents.edit_hook.sample_embeddings(image, 7, 2.0), mean)
    assert not torch.allclose(null_text[0], null_text[-1])  # phi_t depends on t, so the two differ
    deterministic_inversion = invert(
        tiny_sd,
        images[:2],
        [SOURCE, SOURCE],
        InversionConfig.of("null_text", num_steps=STEPS, guidance_scale=7.5, inner_steps=2),
    )
    # null-text's iteration counts are passed on
    assert torch.equal(residual.latents.iterations, deterministic_inversion.latents.iterations)
    sampled = edit(tiny_sd, residual, [_request(0, 3, 2.0), _request(1, 4, 2.0)])
    deterministic = edit(tiny_sd, deterministic_inversion, [_request(0, 3, None), _request(1, 4, None)])
    for ours, theirs in zip(sampled, deterministic, strict=True):
        torch.testing.assert_close(ours.latents, theirs.latents)


def test_batched_training_and_sampling_equal_per_image_runs(tiny_sd, images, inverted):
    hook = inverted.latents.edit_hook
    for image in range(2):
        alone = invert(tiny_sd, images[image : image + 1], [SOURCE], _config()).latents.edit_hook
        torch.testing.assert_close(
            hook.history.loss[:, image], alone.history.loss[:, 0], rtol=1e-4, atol=1e-7
        )
        torch.testing.assert_close(
            hook.sample_embeddings(image, 5, 1.0), alone.sample_embeddings(0, 5, 1.0), rtol=1e-4, atol=1e-5
        )
    # The two images' VAEs really differ (so the comparison above is per image).
    assert not torch.allclose(hook.sample_embeddings(0, 5, 1.0), hook.sample_embeddings(1, 5, 1.0))


def _request(image: int, seed: int, temperature: float | None) -> EditRequest:
    return EditRequest(image, TARGET, AttentionControl("replace"), seed=seed, sample_temperature=temperature)


def test_samples_of_all_images_in_one_batch_equal_single_edits(tiny_sd, inverted):
    requests = [_request(0, 1, 1.0), _request(1, 1, 1.0), _request(0, 2, 1.0), _request(0, 1, 1.0)]
    together = edit(tiny_sd, inverted, requests)
    apart = [edit(tiny_sd, inverted, [request])[0] for request in requests[:3]]
    for joint, single in zip(together, apart[:3] + apart[:1], strict=True):
        torch.testing.assert_close(joint.latents, single.latents, rtol=1e-4, atol=1e-5)
    assert torch.equal(together[0].latents, together[3].latents)  # same seed: same edit
    assert not torch.allclose(together[0].latents, together[2].latents, atol=1e-4)  # other seed


def test_deterministic_edits_equal_null_text_inversion(tiny_sd, images, inverted):
    null_text = invert(
        tiny_sd,
        images[:2],
        [SOURCE, SOURCE],
        InversionConfig.of("null_text", num_steps=STEPS, guidance_scale=7.5, inner_steps=2),
    )
    torch.testing.assert_close(inverted.reconstructions, null_text.reconstructions)
    requests = [_request(0, 1, None), _request(1, 4, None)]
    for ours, theirs in zip(
        edit(tiny_sd, inverted, requests), edit(tiny_sd, null_text, requests), strict=True
    ):
        torch.testing.assert_close(ours.latents, theirs.latents)
    assert torch.equal(inverted.latents.iterations, null_text.latents.iterations)


def test_sample_request_on_a_deterministic_method_is_refused(tiny_sd, images):
    ddim = invert(tiny_sd, images[:1], [SOURCE], InversionConfig.of("ddim", num_steps=STEPS))
    with pytest.raises(EngineInputError, match=r"requests\[0\].*null_text_vae"):
        edit(tiny_sd, ddim, [_request(0, 1, 1.0)])
    with pytest.raises(EngineInputError, match=r"sample_temperature=-1.0"):
        edit(tiny_sd, ddim, [dataclasses.replace(_request(0, 1, 1.0), sample_temperature=-1.0)])


def test_cyclical_beta_with_one_cycle_and_without_a_ramp():
    # One cycle spans the whole run; no ramp (ramp 0) is beta throughout, with no division by zero.
    assert [cyclical_beta(k, 8, 2.0, 1, 0.5) for k in range(8)] == pytest.approx(
        [0.0, 0.5, 1.0, 1.5, 2.0, 2.0, 2.0, 2.0]
    )
    assert [cyclical_beta(k, 8, 2.0, 0, 0.5) for k in range(8)] == [
        cyclical_beta(k, 8, 2.0, 1, 0.5) for k in range(8)
    ]
    assert [cyclical_beta(k, 8, 2.0, 2, 0.0) for k in range(8)] == [2.0] * 8


def test_initial_weights_are_uniform_within_one_over_root_fan_in():
    """torch.nn.Linear's default: weights and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)); the last
    layer (the 1x1 expansion) starts at zero; every image starts from the same draw."""
    params = dataclasses.replace(_config().method_params, latent_dim=64, hidden_dim=256, reduced_channels=64)
    vae = EmbeddingVAE(2, 5, 32, params, torch.zeros(2, 5, 32), torch.Generator().manual_seed(0), False)
    for name in ("reduce", "encode", "mu", "logvar", "decode", "unflatten"):
        weight, bias = getattr(vae, f"{name}_weight"), getattr(vae, f"{name}_bias")
        bound = 1.0 / weight.shape[1] ** 0.5
        for values in (weight, bias):
            assert torch.equal(values[0], values[1])
            assert values.abs().max() <= bound
            assert values.max() > 0.8 * bound and values.min() < -0.8 * bound, name
            assert abs(values.mean().item()) < 0.1 * bound, name
    assert not vae.expand_weight.any() and not vae.expand_bias.any()


def test_training_order_and_noise_follow_the_seed(tiny_sd, images):
    """Each epoch draws its own permutation of the S steps, then one (1, Z) noise per iteration, from
    the generator seeded with `seed` after the initial weights."""
    # Its own inversion, not the module's: mutmut runs only the tests that call the mutated function.
    inversion = invert(tiny_sd, images[:2], [SOURCE, SOURCE], _config())
    params = inversion.config.method_params
    hook = inversion.latents.edit_hook
    generator = torch.Generator().manual_seed(params.seed)
    EmbeddingVAE(2, *hook.null_text.shape[2:], params, hook.null_text.mean(dim=0), generator, False)
    expected = []
    for _ in range(params.epochs):
        expected += torch.randperm(STEPS, generator=generator).tolist()
        for _ in range(STEPS):
            torch.randn(1, params.latent_dim, generator=generator)
    assert hook.history.step_index == expected
    assert len(set(tuple(expected[i : i + STEPS]) for i in range(0, len(expected), STEPS))) > 1


def test_samples_at_temperature_one_are_the_reparameterised_decode(inverted):
    """After training (the expansion no longer zero), a sample is decode(mu + tau sigma eps) with eps
    drawn (S, Z) from the request's seed: one noise row per step."""
    hook = inverted.latents.edit_hook
    assert hook.vae.expand_weight.abs().max() > 0
    for temperature in (1.0, 2.5):
        noise = torch.randn(STEPS, hook.vae.mu_weight.shape[-1], generator=torch.Generator().manual_seed(11))
        sampled = hook.sample_embeddings(1, 11, temperature)
        for step in range(STEPS):
            timestep = int(inverted.schedule.timesteps[step])
            expected, _, _ = _reference_decode(
                hook.vae, 1, hook.null_text[step, 1], timestep, noise[step], temperature
            )
            torch.testing.assert_close(sampled[step], expected.detach(), rtol=1e-5, atol=1e-6)
    # The module's own default temperature is 1 (training samples with it).
    images, timesteps = torch.ones(STEPS, dtype=torch.long), inverted.schedule.timesteps
    with torch.no_grad():
        default, _, _ = hook.vae.sample(hook.null_text[:, 1], timesteps, images, noise)
        explicit, _, _ = hook.vae.sample(hook.null_text[:, 1], timesteps, images, noise, 1.0)
    assert torch.equal(default, explicit)
    assert inverted.latents.edit_hook.history.beta == pytest.approx(
        [cyclical_beta(k, 4 * STEPS, 0.5, 2, 0.5) for k in range(4 * STEPS)]
    )


def test_a_non_finite_vae_loss_fails_its_images_with_the_iteration_and_step(tiny_sd, images):
    result = invert(tiny_sd, images[:2], [SOURCE, SOURCE], _config(alpha=float("inf")))
    first_step = result.latents.edit_hook.history.step_index[0]
    for image in range(2):
        assert result.errors[image] == (
            f"image {image}: non-finite loss in null-text VAE training at iteration 0 (step {first_step})"
        )


def test_an_image_failed_by_null_text_keeps_its_initial_vae_and_error(tiny_sd, images):
    """Image 1's null-text loop fails; its VAE gets no gradient (its weights stay the initial draw) and
    its error stays null-text's, while image 0 trains as it would alone."""
    calls = {"count": 0}

    def poison(module, args, kwargs, output):
        calls["count"] += 1
        if calls["count"] == STEPS + 2:  # the first optimisation call after the pivotal inversion
            output.sample[1:] = float("nan")
        return output

    handle = tiny_sd.unet.register_forward_hook(poison, with_kwargs=True)
    try:
        result = invert(tiny_sd, images[:2], [SOURCE, SOURCE], _config())
    finally:
        handle.remove()
    assert result.errors[0] is None
    assert "non-finite loss in null-text optimisation" in result.errors[1], result.errors
    vae = result.latents.edit_hook.vae
    params = result.config.method_params
    initial = EmbeddingVAE(
        2, *vae.base.shape[1:], params, vae.base, torch.Generator().manual_seed(params.seed), False
    )
    for name, value in initial.named_parameters():
        assert torch.equal(getattr(vae, name)[1], value[1]), name
    alone = invert(tiny_sd, images[:1], [SOURCE], _config()).latents.edit_hook
    torch.testing.assert_close(
        result.latents.edit_hook.history.loss[:, 0], alone.history.loss[:, 0], rtol=1e-4, atol=1e-7
    )


@pytest.mark.parametrize("field", ["epochs", "latent_dim", "reduced_channels", "hidden_dim"])
def test_sizes_below_one_are_refused_and_one_is_accepted(tiny_sd, images, field):
    with pytest.raises(
        EngineInputError,
        match=r"^null_text_vae: epochs, latent_dim, reduced_channels and hidden_dim must be at least 1\.$",
    ):
        invert(tiny_sd, images[:1], [SOURCE], _config(**{field: 0}))
    result = invert(tiny_sd, images[:1], [SOURCE], _config(**{field: 1}))
    assert result.errors == [None]


def test_sampled_training_path_walks_every_epoch_from_z_T_along_its_own_steps(tiny_sd, images):
    """`training_path: sampled`: each epoch trains the steps in sampling order, the first from z*_T and
    every later one from the latent the previous iteration landed on (its guided DDIM step, re-derived
    from the recorded UNet calls), not from null-text's path."""
    calls = []

    def record(module, args, kwargs, output):
        latents = args[0] if args else kwargs["sample"]
        calls.append((latents.detach().clone(), output.sample.detach().clone()))

    handle = tiny_sd.unet.register_forward_hook(record, with_kwargs=True)
    try:
        result = invert(tiny_sd, images[:2], [SOURCE, SOURCE], _config(training_path="sampled"))
    finally:
        handle.remove()
    params, schedule = result.config.method_params, result.schedule
    history, trajectory = result.latents.edit_hook.history, result.latents.trajectory
    iterations = params.epochs * STEPS
    assert history.step_index == list(range(STEPS)) * params.epochs
    training = calls[-2 * iterations :]  # per iteration: the fixed (cond) call, then the optimised one
    timesteps = [int(t) for t in schedule.timesteps]
    for iteration in range(iterations):
        (cond_start, cond), (start, uncond) = training[2 * iteration], training[2 * iteration + 1]
        assert torch.equal(start, cond_start)
        step = iteration % STEPS
        if step == 0:
            assert torch.equal(start, trajectory[-1])
        else:
            (_, previous_cond), (previous, previous_uncond) = training[2 * iteration - 2 : 2 * iteration]
            guided = previous_uncond + 7.5 * (previous_cond - previous_uncond)
            expected = schedule.step(guided, timesteps[step - 1], previous)
            torch.testing.assert_close(start, expected, rtol=1e-5, atol=1e-6)
        landed = schedule.step(uncond + 7.5 * (cond - uncond), timesteps[step], start)
        reconstruction = (landed - trajectory[STEPS - step - 1]).pow(2).flatten(1).mean(dim=1)
        torch.testing.assert_close(history.reconstruction[iteration], reconstruction, rtol=1e-4, atol=1e-9)


def test_the_residual_decoder_adds_its_decode_to_the_encoded_embeddings():
    params = _config().method_params
    generator = torch.Generator().manual_seed(5)
    vae = EmbeddingVAE(1, 6, 8, params, torch.zeros(1, 6, 8), generator, add_input=True)
    with torch.no_grad():  # a trained expansion: the untrained one is zero
        vae.expand_weight.normal_(generator=generator)
        vae.expand_bias.normal_(generator=generator)
    embeddings = torch.randn(2, 6, 8, generator=generator)
    noise = torch.randn(2, params.latent_dim, generator=generator)
    timesteps = torch.tensor([900, 100])
    with torch.no_grad():
        sampled, _, _ = vae.sample(embeddings, timesteps, torch.zeros(2, dtype=torch.long), noise, 1.5)
        for row in range(2):
            expected, _, _ = _reference_decode(vae, 0, embeddings[row], int(timesteps[row]), noise[row], 1.5)
            torch.testing.assert_close(sampled[row], expected)
    assert (sampled - embeddings).abs().max() > 0.1


def test_null_text_training_path_starts_every_step_from_null_texts_path(tiny_sd, images):
    """`training_path: null_text`: every iteration's optimised call starts from z~_t, null-text's
    reconstruction path at the step drawn (teacher forcing), whatever the VAE did before."""
    calls = []

    def record(module, args, kwargs, output):
        calls.append((args[0] if args else kwargs["sample"]).detach().clone())

    handle = tiny_sd.unet.register_forward_hook(record, with_kwargs=True)
    try:
        result = invert(tiny_sd, images[:2], [SOURCE, SOURCE], _config())
    finally:
        handle.remove()
    latents, history = result.latents, result.latents.edit_hook.history
    path = []
    sample(
        tiny_sd.unet,
        result.schedule,
        latents.trajectory[-1],
        latents.cond_embeddings,
        latents.uncond_embeddings,
        7.5,
        after_step=lambda i, z: path.append(z.clone()) or z,
    )
    starts = [latents.trajectory[-1]] + path
    training = calls[-len(history.step_index) :]  # one optimised call per iteration
    assert set(history.step_index[:STEPS]) == set(range(STEPS))
    assert history.step_index[:STEPS] != list(range(STEPS)) or history.step_index[STEPS : 2 * STEPS] != list(
        range(STEPS)
    )
    for start, step in zip(training, history.step_index, strict=True):
        torch.testing.assert_close(start, starts[step], rtol=1e-4, atol=1e-5)


def _dataset_vae(model, seed: int) -> EmbeddingVAE:
    """A dataset-wide VAE (one set of weights) whose last layer is random, so its samples are not phi_t."""
    params = _config().method_params
    generator = torch.Generator().manual_seed(seed)
    tokens, channels = (
        model.text_encoder.config.max_position_embeddings,
        model.text_encoder.config.hidden_size,
    )
    vae = EmbeddingVAE(
        1, tokens, channels, params, torch.zeros(1, tokens, channels), generator, add_input=True
    )
    with torch.no_grad():
        vae.expand_weight.copy_(torch.randn(vae.expand_weight.shape, generator=generator))
        vae.logvar_bias.fill_(1.0)
    return vae.requires_grad_(False)


def test_a_dataset_vae_is_shared_by_every_image_and_left_untrained(tiny_sd, images):
    """`vae` (the amortised option): no VAE is trained per image; every image samples from the one VAE
    given, phi'_t = phi_t + D(mu + tau sigma eps) with its own phi_t and the seed's eps."""
    vae = _dataset_vae(tiny_sd, seed=5)
    before = {name: tensor.clone() for name, tensor in vae.state_dict().items()}
    config = _config(vae="out/vaes/dataset/artefact", decoder_base="input")
    result = invert(tiny_sd, images[:2], [SOURCE, SOURCE], config, embedding_vae=vae)
    hook = result.latents.edit_hook
    assert hook.vae is vae and hook.history is None
    assert all(torch.equal(tensor, before[name]) for name, tensor in vae.state_dict().items())
    null_text = invert(
        tiny_sd,
        images[:2],
        [SOURCE, SOURCE],
        InversionConfig.of("null_text", num_steps=STEPS, guidance_scale=7.5, inner_steps=2),
    )
    assert torch.equal(hook.null_text, null_text.latents.uncond_embeddings)  # null-text inversion as before
    timesteps = [int(t) for t in result.schedule.timesteps]
    for image in range(2):
        noise = torch.randn(STEPS, 4, generator=torch.Generator().manual_seed(9))
        sampled = hook.sample_embeddings(image, 9, 2.0)
        for step in range(STEPS):
            expected, _, _ = _reference_decode(
                vae, 0, hook.null_text[step, image], timesteps[step], noise[step], 2.0
            )
            torch.testing.assert_close(sampled[step], expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(hook.sample_embeddings(0, 9, 2.0), hook.null_text[:, 0])
    # Batched edits of both images equal single edits (each image reads weights 0, not its index).
    requests = [_request(0, 1, 1.0), _request(1, 1, 1.0)]
    together = edit(tiny_sd, result, requests)
    for request, joint in zip(requests, together, strict=True):
        torch.testing.assert_close(
            joint.latents, edit(tiny_sd, result, [request])[0].latents, rtol=1e-4, atol=1e-5
        )


def test_a_dataset_vae_is_passed_exactly_when_the_config_names_one(tiny_sd, images):
    with pytest.raises(
        EngineInputError, match="inversion.params.vae is 'out/v' but invert\\(\\) was given no"
    ):
        invert(tiny_sd, images[:1], [SOURCE], _config(vae="out/v"))
    with pytest.raises(EngineInputError, match="inversion.params.vae is None but invert\\(\\) was given an"):
        invert(tiny_sd, images[:1], [SOURCE], _config(), embedding_vae=_dataset_vae(tiny_sd, seed=1))


@pytest.mark.parametrize("training_path", ["sampled", "null_text"])
def test_a_one_step_schedule_trains_and_samples(tiny_sd, images, training_path):
    """S = 1: the one step is trained every epoch from z*_T and its samples still differ by seed."""
    config = _config(num_steps=1, decoder_base="input", training_path=training_path)
    result = invert(tiny_sd, images[:1], [SOURCE], config)
    hook = result.latents.edit_hook
    assert result.errors == [None] and hook.history.step_index == [0] * config.method_params.epochs
    assert hook.sample_embeddings(0, 1, 1.0).shape == hook.null_text[:, 0].shape
    assert not torch.equal(hook.sample_embeddings(0, 1, 1.0), hook.sample_embeddings(0, 2, 1.0))


@pytest.mark.parametrize("vae_named", [True, False])
def test_the_method_itself_refuses_a_dataset_vae_given_exactly_when_not_named(tiny_sd, vae_named):
    """Callers other than the engine (which checks first) get the method's own message."""
    from pipeline.diffusion.trajectory import InversionInputs
    from pipeline.methods import null_text_vae

    embeddings = torch.zeros(1, 77, 32)
    inputs = InversionInputs(
        unet=tiny_sd.unet,
        schedule=None,
        clean_latents=torch.zeros(1, 4, 8, 8),
        cond_embeddings=embeddings,
        uncond_embeddings=embeddings,
        guidance_scale=7.5,
        embedding_vae=None if vae_named else _dataset_vae(tiny_sd, seed=1),
    )
    params = _config(vae="out/v" if vae_named else None).method_params
    message = (
        "null_text_vae: give the dataset-wide VAE (inputs.embedding_vae) exactly when params.vae names one."
    )
    with pytest.raises(EngineInputError) as raised:
        null_text_vae.invert(inputs, params)
    assert str(raised.value) == message
