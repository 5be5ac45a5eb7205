"""Semi-amortised encoding (`pipeline.diffusion.decoder_fit`) against least squares and its own promises."""

import pytest
import torch

from pipeline.diffusion.decoder_fit import fit_latents

LATENT_SHAPE = (2, 2, 2)  # (C, h, w): 8 numbers
PIXEL_SHAPE = (3, 4, 4)  # 48 numbers


def linear_decoder(seed: int = 0):
    """D(z) = W vec(z): a decoder whose best latent least squares gives in closed form."""
    generator = torch.Generator().manual_seed(seed)
    weights = torch.randn(48, 8, generator=generator) / 8**0.5

    def decode(latents: torch.Tensor) -> torch.Tensor:
        return (latents.reshape(len(latents), 8) @ weights.T).reshape(len(latents), *PIXEL_SHAPE)

    return decode, weights


class ConvDecoder(torch.nn.Module):
    """A small nonlinear decoder, (B, 2, 4, 4) -> (B, 3, 8, 8) in [-1, 1]."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.Sequential(
            torch.nn.Upsample(scale_factor=2.0),
            torch.nn.Conv2d(2, 8, 3, padding=1),
            torch.nn.SiLU(),
            torch.nn.Conv2d(8, 3, 3, padding=1),
            torch.nn.Tanh(),
        )

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.layers(latents)


def errors(decode, pixels: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return (decode(latents) - pixels).pow(2).mean(dim=(1, 2, 3))


def test_on_a_linear_decoder_the_fit_reaches_the_least_squares_latent():
    decode, weights = linear_decoder()
    pixels = torch.rand(3, *PIXEL_SHAPE) * 2 - 1  # not in the decoder's range: a residual remains
    start = torch.zeros(3, *LATENT_SHAPE)
    fitted = fit_latents(decode, pixels, start, steps=3000, lr=0.01)
    exact = torch.linalg.lstsq(weights, pixels.reshape(3, 48).T).solution.T.reshape(3, *LATENT_SHAPE)
    torch.testing.assert_close(fitted, exact, atol=2e-3, rtol=0)
    torch.testing.assert_close(
        errors(decode, pixels, fitted), errors(decode, pixels, exact), atol=1e-6, rtol=1e-4
    )


def test_the_fit_never_returns_a_latent_drawn_worse_than_the_start_and_improves_on_it():
    decoder = ConvDecoder()
    drawn = torch.randn(4, 2, 4, 4)
    with torch.no_grad():
        pixels = decoder(drawn)  # images the decoder can draw, from latents the fit does not know
    start = drawn + torch.randn(4, 2, 4, 4)
    before = errors(decoder, pixels, start)
    for steps, lr in ((1, 10.0), (100, 0.05)):  # one huge step overshoots: the start must be kept
        after = errors(decoder, pixels, fit_latents(decoder, pixels, start, steps, lr))
        assert bool((after <= before).all())
    assert bool((after < 0.1 * before).all())
    # One small step (Adam's first is lr * sign(gradient)) already lowers every error: K = 1 takes a
    # step and weighs its result.
    one_step = errors(decoder, pixels, fit_latents(decoder, pixels, start, steps=1, lr=0.01))
    assert bool((one_step < before).all())


def test_a_latent_is_fitted_the_same_in_any_batch():
    decoder = ConvDecoder()
    pixels = torch.rand(3, 3, 8, 8) * 1.6 - 0.8
    start = torch.randn(3, 2, 4, 4)
    together = fit_latents(decoder, pixels, start, steps=50)
    alone = torch.cat([fit_latents(decoder, pixels[i : i + 1], start[i : i + 1], steps=50) for i in range(3)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_zero_steps_return_the_start_and_the_decoder_gathers_no_gradients():
    decoder = ConvDecoder()
    pixels = torch.rand(2, 3, 8, 8) * 2 - 1
    start = torch.randn(2, 2, 4, 4)
    assert torch.equal(fit_latents(decoder, pixels, start, steps=0), start)
    with torch.no_grad():  # the engine encodes under no_grad: the fit must still optimise
        fitted = fit_latents(decoder, pixels, start, steps=5)
    assert not fitted.requires_grad and not torch.equal(fitted, start)
    assert all(parameter.grad is None for parameter in decoder.parameters())
    with pytest.raises(ValueError, match="steps must be >= 0"):
        fit_latents(decoder, pixels, start, steps=-1)
