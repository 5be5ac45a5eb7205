"""ZIP's maths (papers/000) against independent forms: eq. 5 against the DDIM step and its own algebra,
the h-space shift against diffusers' ControlNet residual path, Algorithm 1's t_zip switch, and eq. 6."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.diffusion.ddim import ddim_move
from pipeline.methods import diffusion_clip as dc
from pipeline.methods import zip_attribute as za


def _tensors(seed: int, shape=(2, 4, 8, 8)) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(3)]


def test_the_asymmetric_step_with_the_same_noise_is_the_ddim_step():
    noise, _, latents = _tensors(0)
    assert torch.allclose(
        za.asymmetric_step(noise, noise, latents, 0.3, 0.6), ddim_move(noise, latents, 0.3, 0.6)
    )


def test_the_asymmetric_step_moves_only_the_predicted_clean_term():
    # x_{t-1}(eps~, eps) - x_{t-1}(eps, eps) = sqrt(a_{t-1}) (P_t(eps~) - P_t(eps))
    #                                       = -sqrt(a_{t-1}) sqrt(1 - a_t) / sqrt(a_t) (eps~ - eps)
    noise, edited, latents = _tensors(1)
    alpha, alpha_prev = 0.25, 0.7
    shift = za.asymmetric_step(edited, noise, latents, alpha, alpha_prev) - ddim_move(
        noise, latents, alpha, alpha_prev
    )
    expected = -(alpha_prev**0.5) * (1 - alpha) ** 0.5 / alpha**0.5 * (edited - noise)
    assert torch.allclose(shift, expected, atol=1e-5)
    # ...which is not what changing eps in both terms does (the cancellation eq. 5 avoids)
    both = ddim_move(edited, latents, alpha, alpha_prev) - ddim_move(noise, latents, alpha, alpha_prev)
    assert not torch.allclose(shift, both, atol=1e-3)


def test_the_head_has_five_layers_and_starts_at_zero():
    head = za.AttributeHead(channels=16, hidden=8)
    assert sum(isinstance(layer, torch.nn.Conv2d) for layer in head.layers) == za.HEAD_LAYERS
    features = torch.randn(3, 16, 4, 4)
    assert torch.equal(head(features, torch.randn(16)), torch.zeros_like(features))


def test_the_head_reads_the_reference_code_per_row():
    torch.manual_seed(0)
    head = za.AttributeHead(channels=8, hidden=8)
    torch.nn.init.normal_(head.layers[-1].weight)
    features, codes = torch.randn(2, 8, 4, 4), torch.randn(2, 8)
    together = head(features, codes)
    for row in range(2):
        assert torch.allclose(together[row], head(features[row : row + 1], codes[row])[0], atol=1e-6)
    assert not torch.allclose(together[0], head(features[:1], codes[1])[0], atol=1e-4)


def test_standardised_codes_are_read_as_centred_and_scaled_by_their_rms():
    torch.manual_seed(0)
    head = za.AttributeHead(channels=8, hidden=8)
    torch.nn.init.normal_(head.layers[-1].weight)
    codes = 16.0 + 0.5 * torch.randn(5, 8, dtype=torch.float64)
    features, code = torch.randn(2, 8, 4, 4), 16.0 + torch.randn(8)
    plain = head(features, code)
    head.standardise_codes(codes.float())
    # By hand, in float64: the mean over the references and one scale, the root mean square of the
    # centred codes over references and channels.
    mean = codes.mean(dim=0)
    rms = float(((codes - mean) ** 2).sum() / codes.numel()) ** 0.5
    unstandardised = za.AttributeHead(channels=8, hidden=8)
    unstandardised.load_state_dict(
        {**head.state_dict(), "code_mean": torch.zeros(8), "code_scale": torch.ones(())}
    )
    expected = unstandardised(features, ((code.double() - mean) / rms).float())
    torch.testing.assert_close(head(features, code), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(head(features, code), plain, atol=1e-3)
    with pytest.raises(ValueError, match="reference codes of 3 references do not differ"):
        head.standardise_codes(torch.ones(3, 8))


def _down_residual_shapes(unet, latents, timestep, embeddings) -> list[torch.Size]:
    shapes = []
    handles = [
        block.register_forward_hook(lambda module, args, output: shapes.extend(o.shape for o in output[1]))
        for block in unet.down_blocks
    ]
    unet(latents, timestep, encoder_hidden_states=embeddings)
    for handle in handles:
        handle.remove()
    conv_in = unet.conv_in(latents).shape
    return [conv_in, *shapes]


def test_the_h_space_shift_equals_diffusers_mid_block_residual(tiny_sd):
    # A second implementation: diffusers adds mid_block_additional_residual to the mid block's output
    # (its ControlNet path, which needs down residuals too: zeros change nothing).
    unet = tiny_sd.unet
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, tiny_sd.latent_size, tiny_sd.latent_size, generator=generator)
    embeddings = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad(), za.captured_mid_features(unet) as captured:
        plain = unet(latents, 500, encoder_hidden_states=embeddings).sample
    delta = 0.5 * torch.randn(captured[0].shape, generator=generator)
    with torch.no_grad():
        with za.shifted_h_space(unet, lambda features: delta):
            shifted = unet(latents, 500, encoder_hidden_states=embeddings).sample
        zeros = tuple(torch.zeros(shape) for shape in _down_residual_shapes(unet, latents, 500, embeddings))
        reference = unet(
            latents,
            500,
            encoder_hidden_states=embeddings,
            down_block_additional_residuals=zeros,
            mid_block_additional_residual=delta,
        ).sample
        after = unet(latents, 500, encoder_hidden_states=embeddings).sample
    assert torch.allclose(shifted, reference, atol=1e-5)
    assert not torch.allclose(shifted, plain, atol=1e-4)
    assert torch.equal(after, plain)  # the hook is gone after the block


def test_paired_noise_is_the_plain_call_and_the_shifted_call(tiny_sd):
    unet = tiny_sd.unet
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, tiny_sd.latent_size, tiny_sd.latent_size, generator=generator)
    embeddings = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)

    def noise_fn(x, timestep):
        return unet(x, timestep, encoder_hidden_states=embeddings.expand(x.shape[0], -1, -1)).sample

    def delta(features):
        return 0.3 * torch.tanh(features)

    with torch.no_grad():
        noise, edited = za.paired_noise(noise_fn, unet, delta)(latents, 700)
        with za.shifted_h_space(unet, delta):
            shifted = noise_fn(latents, 700)
        plain = noise_fn(latents, 700)
        same, same_edited = za.paired_noise(noise_fn, unet, torch.zeros_like)(latents, 700)
    assert torch.allclose(noise, plain, atol=1e-5) and torch.allclose(edited, shifted, atol=1e-5)
    assert not torch.allclose(noise, edited, atol=1e-4)
    assert torch.equal(same, same_edited)  # Δh = 0: both halves are the same numbers


def test_the_reference_code_is_the_spatial_mean_of_h():
    features = torch.randn(3, 5, 4, 4)
    assert torch.allclose(za.reference_codes(features), features.flatten(2).mean(-1))


class _Recorder:
    """A fake eps_theta: a fixed linear function of x_t, recording the timesteps it was called at."""

    def __init__(self, offset: float) -> None:
        self.offset, self.timesteps = offset, []

    def __call__(self, latents: torch.Tensor, timestep: int) -> torch.Tensor:
        self.timesteps.append(timestep)
        return 0.1 * latents + self.offset


@pytest.fixture()
def grid() -> dc.ReturnGrid:
    from diffusers import DDIMScheduler

    return dc.ReturnGrid.from_scheduler(DDIMScheduler(), return_step=600, num_steps=6)


def _paired(noise: _Recorder, edited: _Recorder):
    return lambda latents, timestep: (noise(latents, timestep), edited(latents, timestep))


def test_generation_takes_the_asymmetric_step_above_t_zip_only(grid):
    noise, edited = _Recorder(0.0), _Recorder(0.3)
    start = _tensors(2)[2]
    result = za.generate(noise, _paired(noise, edited), grid, start, zip_step=300)
    assert edited.timesteps == [600, 500, 400]
    assert noise.timesteps == [600, 500, 400, 300, 200, 100]
    # The same pass written out level by level.
    latents = start
    for level in range(6, 0, -1):
        timestep, alpha, alpha_prev = int(grid.timesteps[level]), grid.alpha(level), grid.alpha(level - 1)
        eps = 0.1 * latents
        if timestep > 300:
            latents = za.asymmetric_step(eps + 0.3, eps, latents, alpha, alpha_prev)
        else:
            latents = ddim_move(eps, latents, alpha, alpha_prev)
    assert torch.allclose(result, latents, atol=1e-5)


def test_without_delta_h_generation_is_diffusion_clip_s_ddim_generation(grid):
    noise = _Recorder(0.0)
    start = _tensors(3)[2]
    result = za.generate(noise, _paired(noise, noise), grid, start, 300)
    assert torch.allclose(result, dc.generate(noise, grid, start), atol=1e-6)


def _embed(images: torch.Tensor) -> torch.Tensor:
    return F.normalize(images.mean(dim=(2, 3)), dim=-1)


@pytest.mark.parametrize("batch", [2, 3])
def test_the_loss_is_eq_6(batch):
    generator = torch.Generator().manual_seed(4)
    edited, images = (torch.rand(batch, 3, 8, 8, generator=generator) * 2 - 1 for _ in range(2))
    direction = torch.randn(3, generator=generator)
    loss, terms = za.zip_loss(edited, images, _embed, direction, za.LossWeights(clip=0.7, recon=2.0))
    image_direction = _embed((edited + 1) / 2) - _embed((images + 1) / 2)
    cosine = (image_direction * direction).sum(-1) / (image_direction.norm(dim=-1) * direction.norm())
    expected_direction = (1 - cosine).mean()
    expected_l1 = (edited - images).abs().mean()
    assert torch.allclose(terms["direction"], expected_direction, atol=1e-6)
    assert torch.allclose(terms["l1"], expected_l1, atol=1e-6)
    assert torch.allclose(loss, 0.7 * expected_direction + 2.0 * expected_l1, atol=1e-6)


def test_with_an_ensemble_of_clips_the_direction_term_is_the_mean_of_each_clips_own():
    generator = torch.Generator().manual_seed(5)
    edited, images = (torch.rand(3, 3, 8, 8, generator=generator) * 2 - 1 for _ in range(2))

    def wide(batch: torch.Tensor) -> torch.Tensor:  # another CLIP, 5 wide
        return F.normalize(batch.flatten(1)[:, :5], dim=-1)

    narrow_direction, wide_direction = (
        torch.randn(3, 3, generator=generator),
        torch.randn(3, 5, generator=generator),
    )
    weights = za.LossWeights(clip=1.0, recon=0.5)
    _, narrow = za.zip_loss(edited, images, _embed, narrow_direction, weights)
    _, alone = za.zip_loss(edited, images, wide, wide_direction, weights)
    embed = dc.ensemble_embed([_embed, wide])
    loss, terms = za.zip_loss(
        edited, images, embed, dc.member_rows([narrow_direction, wide_direction]), weights
    )
    expected = (narrow["direction"] + alone["direction"]) / 2
    torch.testing.assert_close(terms["direction"], expected)
    torch.testing.assert_close(loss, expected + 0.5 * (edited - images).abs().mean())


def test_training_losses_come_from_the_levels_above_t_zip_and_reach_only_the_head(grid):
    torch.manual_seed(0)
    head = za.AttributeHead(channels=4, hidden=4)
    torch.nn.init.normal_(head.layers[-1].weight, std=0.1)
    frozen = torch.nn.Conv2d(4, 4, 1).requires_grad_(False)
    code = torch.randn(4)

    def paired_noise_fn(latents, timestep):
        return frozen(latents), frozen(latents + head(latents, code))

    losses = list(
        za.training_losses(
            paired_noise_fn,
            grid,
            _tensors(5)[2],
            zip_step=300,
            decode=lambda latents: torch.tanh(latents[:, :3]),
            embed=_embed,
            text_direction=torch.tensor([1.0, 0.0, -1.0]),
            weights=za.LossWeights(),
        )
    )
    assert len(losses) == 3  # t = 600, 500, 400
    losses[0][0].backward()
    assert head.layers[-1].weight.grad is not None and head.layers[-1].weight.grad.abs().sum() > 0
    assert frozen.weight.grad is None


def test_an_untrained_head_gives_zero_l1_at_every_level(grid):
    head = za.AttributeHead(channels=4, hidden=4)  # last layer zero: eps~ == eps
    code = torch.randn(4)
    losses = za.training_losses(
        lambda latents, t: (0.1 * latents, 0.1 * (latents + head(latents, code))),
        grid,
        _tensors(6)[2],
        zip_step=300,
        decode=lambda latents: torch.tanh(latents[:, :3]),
        embed=_embed,
        text_direction=torch.tensor([1.0, 0.0, -1.0]),
        weights=za.LossWeights(),
    )
    assert all(float(terms["l1"]) == 0.0 for _, terms in losses)


@pytest.mark.parametrize("batch", [2, 3])
def test_the_full_pass_generates_both_branches_as_the_step_functions_do(grid, batch):
    torch.manual_seed(0)
    head = za.AttributeHead(channels=4, hidden=4)
    torch.nn.init.normal_(head.layers[-1].weight, std=0.1)
    frozen = torch.nn.Conv2d(4, 4, 1).requires_grad_(False)
    code, called_at = torch.randn(4), []

    def noise_fn(latents, timestep):
        called_at.append(("eps", timestep))
        return 0.1 * frozen(latents)

    def paired(latents, timestep):
        called_at.append(("paired", timestep))
        return 0.1 * frozen(latents), 0.1 * frozen(latents + head(latents, code))

    start = _tensors(7, shape=(batch, 4, 8, 8))[2]
    decoded = []

    def decode(latents):
        decoded.append(latents.detach())
        return torch.tanh(latents[:, :3])

    loss, terms = za.full_pass_loss(
        paired, noise_fn, grid, start, 300, decode, _embed, torch.tensor([1.0, 0.0, -1.0]), za.LossWeights()
    )
    # Algorithm 1's switch: both noises above t_zip, eps alone at and below it.
    assert called_at == [("paired", t) for t in (600, 500, 400)] + [("eps", t) for t in (300, 200, 100)]
    plain, edited = decoded[0].chunk(2)
    with torch.no_grad():
        assert torch.allclose(plain, dc.generate(noise_fn, grid, start), atol=1e-5)
        assert torch.allclose(edited, za.generate(noise_fn, paired, grid, start, 300), atol=1e-5)
    expected, _ = za.zip_loss(
        torch.tanh(edited[:, :3]),
        torch.tanh(plain[:, :3]),
        _embed,
        torch.tensor([1.0, 0.0, -1.0]),
        za.LossWeights(),
    )
    assert torch.allclose(loss, expected, atol=1e-6)
    loss.backward()
    assert head.layers[-1].weight.grad.abs().sum() > 0 and frozen.weight.grad is None


def _full_pass_with_a_head(grid, seed: int) -> tuple[tuple, za.AttributeHead, list[torch.Tensor]]:
    """full_pass_loss's arguments with a random head on a linear noise predictor, the head, and the list
    the decoder appends each decoded batch of latents to ([without Δh ; with Δh])."""
    torch.manual_seed(seed)
    head = za.AttributeHead(channels=4, hidden=4)
    torch.nn.init.normal_(head.layers[-1].weight, std=0.1)
    code = torch.randn(4)

    def noise_fn(latents, timestep):
        return 0.1 * latents

    def paired(latents, timestep):
        return noise_fn(latents, timestep), 0.1 * (latents + head(latents, code))

    decoded = []

    def decode(latents):
        decoded.append(latents.detach())
        return torch.tanh(latents[:, :3])

    start = _tensors(seed + 8)[2]
    arguments = (paired, noise_fn, grid, start, 300, decode, _embed, torch.tensor([1.0, 0.0, -1.0]))
    return (*arguments, za.LossWeights()), head, decoded


def test_the_full_pass_adds_the_weighted_prior_on_the_latents_with_delta_h(grid):
    arguments, _, decoded = _full_pass_with_a_head(grid, seed=1)
    prior = dc.PriorTerm(
        noise_fn=lambda latents, t: torch.sin(latents),
        timestep=100,
        alpha=0.5,
        noise=torch.randn_like(arguments[3]),
        weight=2.0,
    )
    with_prior, terms = za.full_pass_loss(*arguments, prior=prior)
    plain, plain_terms = za.full_pass_loss(*arguments)
    edited = decoded[0].chunk(2)[1]
    torch.testing.assert_close(with_prior, plain + 2.0 * dc.prior_loss(edited, prior).mean())
    assert terms.keys() == plain_terms.keys()


def test_the_full_pass_adds_the_weighted_teachers_error_on_the_images_with_delta_h(grid):
    arguments, head, decoded = _full_pass_with_a_head(grid, seed=2)
    teacher_images = torch.rand(arguments[3].shape[0], 3, 8, 8) * 2.0 - 1.0
    with_teacher, terms = za.full_pass_loss(*arguments, teacher=za.TeacherTerm(teacher_images, 3.0))
    plain, plain_terms = za.full_pass_loss(*arguments)
    edited_images = torch.tanh(decoded[0].chunk(2)[1][:, :3])  # the Δh half, not the plain half
    error = ((edited_images - teacher_images) ** 2).mean()
    torch.testing.assert_close(with_teacher, plain + 3.0 * error)
    torch.testing.assert_close(terms["teacher"], error)
    assert terms.keys() - plain_terms.keys() == {"teacher"}
    with_teacher.backward()
    assert head.layers[-1].weight.grad.abs().sum() > 0


def test_the_full_pass_of_an_untrained_head_has_no_direction_and_no_l1(grid):
    head = za.AttributeHead(channels=4, hidden=4)
    code = torch.randn(4)

    def noise_fn(latents, timestep):
        return 0.1 * latents

    def paired(latents, timestep):
        return noise_fn(latents, timestep), 0.1 * (latents + head(latents, code))

    loss, terms = za.full_pass_loss(
        paired,
        noise_fn,
        grid,
        _tensors(8)[2],
        300,
        lambda latents: torch.tanh(latents[:, :3]),
        _embed,
        torch.tensor([1.0, 0.0, -1.0]),
        za.LossWeights(),
    )
    assert float(terms["l1"]) == 0.0 and float(terms["direction"]) == 1.0  # cos(0, ΔT) = 0


def test_the_head_is_as_wide_as_it_says_and_rebuilds_from_what_it_records():
    # The artefact records (channels, hidden) and rebuilds the head from them (pipeline.training.zip_encoder).
    head = za.AttributeHead(channels=16, hidden=8)
    assert (head.channels, head.hidden) == (16, 8)
    convolutions = [layer for layer in head.layers if isinstance(layer, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convolutions] == [
        (32, 8),
        (8, 8),
        (8, 8),
        (8, 8),
        (8, 16),
    ]
    za.AttributeHead(head.channels, head.hidden).load_state_dict(head.state_dict())
    # Without a width the inner layers are min(C, 256) wide (the training spec's documented default).
    assert za.AttributeHead(channels=12).hidden == 12
    wide = za.AttributeHead(channels=300)
    assert wide.hidden == 256 and wide.layers[0].out_channels == 256


def test_the_head_reads_a_reference_code_of_another_dtype_as_the_features_dtype():
    torch.manual_seed(0)
    head = za.AttributeHead(channels=8, hidden=8)
    torch.nn.init.normal_(head.layers[-1].weight)
    features, code = torch.randn(2, 8, 4, 4), torch.randn(8, dtype=torch.float64)
    assert torch.equal(head(features, code), head(features, code.float()))


def test_the_embedding_sees_the_images_mapped_to_0_1_and_clamped():
    # A decoder overshoots [-1, 1]; CLIP reads [0, 1]. Three rows: the two halves are split by rows.
    generator = torch.Generator().manual_seed(9)
    edited, images = (1.5 * torch.randn(3, 3, 8, 8, generator=generator) for _ in range(2))
    seen = []

    def embed(pixels):
        seen.append(pixels)
        return _embed(pixels)

    za.zip_loss(edited, images, embed, torch.randn(3, generator=generator), za.LossWeights())
    unit = (torch.cat([edited, images]) + 1) / 2
    expected = torch.where(unit < 0, 0.0, torch.where(unit > 1, 1.0, unit))
    assert len(seen) == 1 and torch.allclose(seen[0], expected)


@pytest.mark.parametrize("zip_step", [300, 0])
def test_training_losses_follow_the_asymmetric_pass_and_score_each_levels_predicted_images(grid, zip_step):
    # t_zip = 0: Δh (and a loss) at every level of the grid.
    torch.manual_seed(0)
    head = za.AttributeHead(channels=4, hidden=4)
    torch.nn.init.normal_(head.layers[-1].weight, std=0.1)
    frozen = torch.nn.Conv2d(4, 4, 1).requires_grad_(False)
    code, calls = torch.randn(4), []

    def noise_fn(latents, timestep):
        return 0.1 * frozen(latents)

    def edited_fn(latents):
        return 0.1 * frozen(latents + head(latents, code))

    def paired(latents, timestep):
        calls.append((timestep, latents.detach().clone()))
        return noise_fn(latents, timestep), edited_fn(latents)

    def decode(latents):
        return torch.tanh(latents[:, :3])

    start, text, weights = (
        _tensors(10, shape=(3, 4, 8, 8))[2],
        torch.tensor([1.0, 0.0, -1.0]),
        za.LossWeights(0.7, 2.0),
    )
    losses = [
        loss.detach()
        for loss, _ in za.training_losses(paired, grid, start, zip_step, decode, _embed, text, weights)
    ]
    trained_at, calls[:] = list(calls), []
    with torch.no_grad():
        za.generate(noise_fn, paired, grid, start, zip_step)
    # The pass continues as generation does (the asymmetric step above t_zip)...
    above = [t for t in reversed(grid.timesteps.tolist()) if t > zip_step]
    assert [t for t, _ in trained_at] == [t for t, _ in calls] == above
    for (_, trained), (_, generated) in zip(trained_at, calls, strict=True):
        assert torch.allclose(trained, generated, atol=1e-5)
    # ...and each level's loss is eq. 6 on DEC(P_t(eps~)) against DEC(P_t(eps)), P_t of eq. 4 written out.
    with torch.no_grad():
        for (timestep, latents), loss in zip(trained_at, losses, strict=True):
            alpha = grid.alpha(grid.timesteps.tolist().index(timestep))

            def clean(eps, latents=latents, alpha=alpha):
                return (latents - (1 - alpha) ** 0.5 * eps) / alpha**0.5

            expected, _ = za.zip_loss(
                decode(clean(edited_fn(latents))), decode(clean(noise_fn(latents, 0))), _embed, text, weights
            )
            assert torch.allclose(loss, expected, atol=1e-5)
