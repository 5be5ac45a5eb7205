"""Stochastic conditional embeddings (§3.2): the VAE's sampling, eqs. 2-4 written out, and the edits its
samples give through the engine."""

import pytest
import torch
import torch.nn.functional as F

from pipeline.diffusion.errors import EngineInputError
from pipeline.diffusion.tokens import encode_prompts
from pipeline.engine import AttentionControl, EditRequest, InversionConfig, edit, invert
from pipeline.methods import cond_vae
from pipeline.methods.null_text_vae import kl_divergence

STEPS = 3
SOURCE = "a red circle on a white background"
TARGET = "a red square on a white background"
OTHER = "a red star on a white background"
SIZES = cond_vae.VAESizes(latent_dim=4, reduced_channels=2, hidden_dim=8)


def _vae(tiny_sd, perturbed: bool = True) -> cond_vae.ConditionalEmbeddingVAE:
    """A VAE for tiny_sd's embeddings; `perturbed` gives its zero-initialised last layer random weights
    (a trained VAE's samples differ, an untrained one's do not)."""
    tokens, channels = encode_prompts(tiny_sd.tokenizer, tiny_sd.text_encoder, [""]).shape[1:]
    vae = cond_vae.ConditionalEmbeddingVAE(tokens, channels, SIZES, torch.Generator().manual_seed(1))
    if perturbed:
        generator = torch.Generator().manual_seed(2)
        with torch.no_grad():
            vae.expand_weight.copy_(torch.randn(vae.expand_weight.shape, generator=generator) * 0.5)
            vae.logvar_bias.fill_(1.0)
    return vae.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def inverted(tiny_sd, images):
    return invert(tiny_sd, images[:2], [SOURCE, SOURCE], InversionConfig.of("ddim", num_steps=STEPS))


def _request(image: int = 0, target: str = TARGET, **changes) -> EditRequest:
    return EditRequest(image, target, AttentionControl(mode="replace"), **changes)


def test_an_untrained_vae_samples_the_prompt_itself(tiny_sd):
    vae = _vae(tiny_sd, perturbed=False)
    prompt = encode_prompts(tiny_sd.tokenizer, tiny_sd.text_encoder, [TARGET]).expand(STEPS, -1, -1)
    sampled = vae.sample_sequence(prompt, torch.tensor([900, 500, 100]), seed=5, temperature=1.0)
    assert torch.equal(sampled, prompt)


def test_samples_are_the_prompt_plus_the_decoded_reparameterised_latent(tiny_sd):
    vae = _vae(tiny_sd)
    prompt = encode_prompts(tiny_sd.tokenizer, tiny_sd.text_encoder, [TARGET]).expand(STEPS, -1, -1)
    timesteps = torch.tensor([900, 500, 100])
    noise = torch.randn(STEPS, SIZES.latent_dim, generator=torch.Generator().manual_seed(7))
    rows = torch.zeros(STEPS, dtype=torch.long)
    mu, logvar = vae.encode(prompt, timesteps, rows)
    expected = prompt + vae.decode(mu + 0.5 * torch.exp(0.5 * logvar) * noise, rows)
    sampled = vae.sample_sequence(prompt, timesteps, seed=7, temperature=0.5)
    assert torch.allclose(sampled, expected, atol=1e-6)
    again = vae.sample_sequence(prompt, timesteps, seed=7, temperature=0.5)
    other = vae.sample_sequence(prompt, timesteps, seed=8, temperature=0.5)
    mean = vae.sample_sequence(prompt, timesteps, seed=9, temperature=0.0)
    assert torch.equal(sampled, again)
    assert not torch.allclose(sampled, other)
    assert torch.allclose(mean, prompt + vae.decode(mu, rows), atol=1e-6)


def test_derangement_is_a_permutation_without_fixed_points():
    generator = torch.Generator().manual_seed(0)
    for count in (2, 3, 5, 8):
        for _ in range(20):
            permutation = cond_vae.derangement(count, generator)
            assert sorted(permutation.tolist()) == list(range(count))
            assert all(permutation[i] != i for i in range(count))
    with pytest.raises(EngineInputError, match="at least 2"):
        cond_vae.derangement(1, generator)


def test_group_derangement_pairs_samples_of_the_same_image_only():
    generator = torch.Generator().manual_seed(0)
    permutation = cond_vae.group_derangement(groups=3, samples=4, generator=generator)
    rows = torch.arange(12)
    assert sorted(permutation.tolist()) == rows.tolist()
    assert torch.equal(permutation // 4, rows // 4)
    assert not bool((permutation == rows).any())


def test_clip_distance_is_one_minus_cosine():
    images = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-2.0, 0.0]])
    text = torch.tensor([3.0, 0.0])
    expected = torch.tensor([0.0, 1.0 - 2**-0.5, 2.0])
    assert torch.allclose(cond_vae.clip_distance(images, text), expected, atol=1e-6)


def test_diversity_loss_is_eq_3_written_out():
    images = torch.rand(4, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    permutation = torch.tensor([1, 0, 3, 2])

    def l1(a, b):
        return (a - b).abs().flatten(1).mean(dim=1)

    expected = sum(float(l1(images[i : i + 1], images[q : q + 1])) for i, q in enumerate(permutation)) / 4
    assert float(cond_vae.diversity_loss(images, permutation, l1)) == pytest.approx(expected, rel=1e-6)


def _batch(tiny_sd, inverted, samples: int) -> cond_vae.TrainingBatch:
    step = 1
    timestep = int(inverted.schedule.timesteps[step])
    latents = inverted.latents.trajectory[STEPS - step]
    uncond = encode_prompts(tiny_sd.tokenizer, tiny_sd.text_encoder, ["", ""])
    with torch.no_grad():
        uncond_noise = tiny_sd.unet(latents, timestep, encoder_hidden_states=uncond).sample
    return cond_vae.TrainingBatch(
        kept_latents=latents,
        timestep=timestep,
        alpha_bar=inverted.schedule.alpha_bar(timestep),
        prompt_embeddings=encode_prompts(tiny_sd.tokenizer, tiny_sd.text_encoder, [TARGET, OTHER]),
        uncond_noise=uncond_noise,
        guidance_scale=7.5,
        class_text=torch.tensor([1.0, -0.5, 0.25]),
        noise=torch.randn(2 * samples, SIZES.latent_dim, generator=torch.Generator().manual_seed(4)),
        samples=samples,
    )


@pytest.mark.parametrize("samples, per_image_text", [(2, False), (4, False), (2, True)])
def test_training_loss_is_eq_4_written_out(tiny_sd, inverted, samples, per_image_text):
    """One UNet call per sample from the kept latent, x0 by DDIM's prediction, the decode clamped to
    [0, 1], then alpha L_CLIP + beta KL + gamma L_div with a hand-made derangement of each image's samples."""
    vae = _vae(tiny_sd).requires_grad_(True)
    batch = _batch(tiny_sd, inverted, samples)
    if per_image_text:  # T of each image its own (its target caption's embedding)
        batch.class_text = torch.tensor([[1.0, -0.5, 0.25], [-0.2, 0.9, 0.4]])
    weights = cond_vae.LossWeights(alpha=0.7, beta=0.2, gamma=-0.3)
    projection = torch.randn(3 * tiny_sd.image_size**2, 3, generator=torch.Generator().manual_seed(5))

    def decode(latents):  # reaches beyond [-1, 1], so the clamp to [0, 1] shows at both ends
        return 3 * torch.tanh(20 * F.interpolate(latents[:, :3], size=tiny_sd.image_size))

    def image_embeddings(pixels):
        return pixels.flatten(1) @ projection

    def distance(a, b):
        return (a - b).abs().flatten(1).mean(dim=1)

    loss, terms = cond_vae.training_loss(
        tiny_sd.unet,
        vae,
        batch,
        decode,
        image_embeddings,
        distance,
        weights,
        torch.Generator().manual_seed(6),
    )

    # Written out row by row: image b's sample k uses noise row b * K + k.
    timesteps = torch.full((1,), batch.timestep)
    rows = torch.zeros(1, dtype=torch.long)
    images, kls = [], []
    for row in range(2 * samples):
        image = row // samples
        prompt = batch.prompt_embeddings[image : image + 1]
        mu, logvar = vae.encode(prompt, timesteps, rows)
        sampled = prompt + vae.decode(mu + torch.exp(0.5 * logvar) * batch.noise[row : row + 1], rows)
        latent = batch.kept_latents[image : image + 1]
        cond = tiny_sd.unet(latent, batch.timestep, encoder_hidden_states=sampled).sample
        uncond = batch.uncond_noise[image : image + 1]
        eps = uncond + 7.5 * (cond - uncond)
        x0 = (latent - (1 - batch.alpha_bar) ** 0.5 * eps) / batch.alpha_bar**0.5
        images.append((decode(x0) / 2 + 0.5).clamp(0, 1))
        kls.append(-0.5 * (1 + logvar - mu**2 - logvar.exp()).sum())
    images = torch.cat(images)
    embeddings = image_embeddings(images)
    texts = batch.class_text.expand(2, -1).repeat_interleave(samples, dim=0)  # row b K + k: image b's text
    clip = (1 - (embeddings * texts).sum(dim=1) / (embeddings.norm(dim=1) * texts.norm(dim=1))).mean()
    permutation = cond_vae.group_derangement(2, samples, torch.Generator().manual_seed(6))
    diversity = distance(images, images[permutation]).mean()
    expected = 0.7 * clip + 0.2 * torch.stack(kls).mean() + -0.3 * diversity
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-4)
    assert terms["clip"] == pytest.approx(float(clip.detach()), rel=1e-4)
    assert terms["kl"] == pytest.approx(float(torch.stack(kls).mean().detach()), rel=1e-4)
    assert terms["diversity"] == pytest.approx(float(diversity.detach()), rel=1e-4)
    assert float(images.detach().min()) == 0.0 and float(images.detach().max()) == 1.0
    assert float(diversity.detach()) > 0
    loss.backward()
    assert float(vae.expand_weight.grad.abs().sum()) > 0  # the gradient reaches the VAE


def test_kl_term_is_the_vaes_kl():
    mu, logvar = torch.randn(5, 4), torch.randn(5, 4)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu, (0.5 * logvar).exp()), torch.distributions.Normal(0.0, 1.0)
    ).sum(dim=1)
    assert torch.allclose(kl_divergence(mu, logvar), expected, atol=1e-5)


def test_one_sample_or_gamma_zero_leaves_out_the_diversity_term(tiny_sd, inverted):
    """K = 1 has no pair to compare (L_div = 0, no derangement drawn); gamma = 0 is allowed."""

    def terms_of(samples: int, gamma: float):
        return cond_vae.training_loss(
            tiny_sd.unet,
            _vae(tiny_sd),
            _batch(tiny_sd, inverted, samples),
            lambda latents: F.interpolate(latents[:, :3], size=tiny_sd.image_size),
            lambda pixels: pixels.flatten(1)[:, :3],
            lambda a, b: (a - b).abs().flatten(1).mean(dim=1),
            cond_vae.LossWeights(alpha=0.5, beta=0.25, gamma=gamma),
            torch.Generator().manual_seed(0),
        )

    for samples, gamma in ((1, -0.3), (2, 0.0)):
        loss, terms = terms_of(samples, gamma)
        assert float(loss.detach()) == pytest.approx(0.5 * terms["clip"] + 0.25 * terms["kl"], rel=1e-5)
    assert terms_of(1, -0.3)[1]["diversity"] == 0.0
    assert terms_of(2, 0.0)[1]["diversity"] > 0.0


def test_derangements_and_initial_weights_come_from_the_given_generator_only(tiny_sd):
    """Reproducible from their seeds whatever the global random state: the training job is seeded."""
    draws = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        draws.append(
            (
                cond_vae.derangement(8, torch.Generator().manual_seed(3)),
                cond_vae.group_derangement(2, 8, torch.Generator().manual_seed(3)),
                _vae(tiny_sd, perturbed=False).state_dict(),
            )
        )
    (first, first_groups, first_weights), (second, second_groups, second_weights) = draws
    assert torch.equal(first, second) and torch.equal(first_groups, second_groups)
    assert all(torch.equal(first_weights[name], second_weights[name]) for name in first_weights)
    # One VAE per target class: every weight (and the zero base) has an image axis of 1.
    assert all(tensor.shape[0] == 1 for tensor in first_weights.values())


def test_eq_4_refuses_a_positive_gamma(tiny_sd, inverted):
    with pytest.raises(EngineInputError, match="gamma <= 0"):
        cond_vae.training_loss(
            tiny_sd.unet,
            _vae(tiny_sd),
            _batch(tiny_sd, inverted, 2),
            lambda x: x,
            lambda x: x,
            lambda a, b: a,
            cond_vae.LossWeights(gamma=0.1),
            torch.Generator(),
        )


class FixedEmbedding:
    """A stand-in sampler: every step's C'' is one fixed embedding."""

    def __init__(self, embedding: torch.Tensor) -> None:
        self.embedding = embedding

    def sample_sequence(self, prompt_embeddings, timesteps, seed, temperature):
        return self.embedding.expand_as(prompt_embeddings)


def test_the_sampled_embedding_conditions_the_edit(tiny_sd, inverted):
    """An edit towards TARGET whose C'' is OTHER's embedding is the deterministic edit towards OTHER (the
    two prompts differ in one word, so Prompt-to-Prompt controls both the same way)."""
    other = encode_prompts(tiny_sd.tokenizer, tiny_sd.text_encoder, [OTHER])[0]
    swapped, direct, own = edit(
        tiny_sd,
        inverted,
        [
            _request(target=TARGET, sample_temperature=1.0, embedding_vae=FixedEmbedding(other)),
            _request(target=OTHER),
            _request(target=TARGET),
        ],
    )
    assert torch.allclose(swapped.latents, direct.latents, atol=1e-5)
    assert not torch.allclose(swapped.latents, own.latents, atol=1e-3)


def test_samples_differ_by_seed_and_repeat_with_it(tiny_sd, inverted):
    vae = _vae(tiny_sd)
    requests = [_request(seed=seed, sample_temperature=1.0, embedding_vae=vae) for seed in (0, 1, 0)]
    first, second, again = edit(tiny_sd, inverted, requests)
    assert torch.equal(first.image, again.image)
    assert not torch.allclose(first.latents, second.latents, atol=1e-3)


def test_samples_of_all_images_in_one_batch_equal_single_edits(tiny_sd, inverted):
    vae = _vae(tiny_sd)
    requests = [
        _request(image, seed=seed, sample_temperature=0.8, embedding_vae=vae)
        for image in (0, 1)
        for seed in (3, 4)
    ]
    batched = edit(tiny_sd, inverted, requests)
    for request, result in zip(requests, batched, strict=True):
        (single,) = edit(tiny_sd, inverted, [request])
        assert torch.allclose(result.latents, single.latents, atol=1e-5)


def test_an_untrained_vae_edits_as_the_deterministic_edit(tiny_sd, inverted):
    vae = _vae(tiny_sd, perturbed=False)
    sampled, deterministic = edit(
        tiny_sd, inverted, [_request(seed=3, sample_temperature=1.0, embedding_vae=vae), _request()]
    )
    assert torch.equal(sampled.latents, deterministic.latents)


def test_a_vae_without_a_temperature_is_refused(tiny_sd, inverted):
    with pytest.raises(EngineInputError, match="no sample_temperature"):
        edit(tiny_sd, inverted, [_request(embedding_vae=_vae(tiny_sd))])
