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
    phi_prime = vae.base[image] + layer(flat.view(phi.shape[0], -1), "expand")
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


def test_first_iteration_loss_is_eq_1_written_out(tiny_sd, images):
    """Re-derive iteration 0 from the seed: initial weights, the step drawn, the noise, the null-text
    reconstruction path and the guided step, all through a second implementation."""
    inversion = invert(tiny_sd, images[:2], [SOURCE, SOURCE], _config())
    hook, latents, schedule = inversion.latents.edit_hook, inversion.latents, inversion.schedule
    params = inversion.config.method_params
    null_text = hook.null_text
    generator = torch.Generator().manual_seed(params.seed)
    initial = EmbeddingVAE(2, *null_text.shape[2:], params, null_text.mean(dim=0), generator)
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


def test_sample_request_on_a_deterministic_method_is_refused(tiny_sd, images):
    ddim = invert(tiny_sd, images[:1], [SOURCE], InversionConfig.of("ddim", num_steps=STEPS))
    with pytest.raises(EngineInputError, match=r"requests\[0\].*null_text_vae"):
        edit(tiny_sd, ddim, [_request(0, 1, 1.0)])
    with pytest.raises(EngineInputError, match=r"sample_temperature=-1.0"):
        edit(tiny_sd, ddim, [dataclasses.replace(_request(0, 1, 1.0), sample_temperature=-1.0)])
