import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from pipeline.metrics.pixel import psnr, ssim


def _noisy_pair(
    generator: torch.Generator, batch: int = 3, size: int = 24
) -> tuple[torch.Tensor, torch.Tensor]:
    clean = torch.rand(batch, 3, size, size, generator=generator)
    noise = (
        0.05 * torch.randn(clean.shape, generator=generator) * torch.arange(1, batch + 1).view(-1, 1, 1, 1)
    )
    return clean, (clean + noise).clamp(0, 1)


def _hwc(image: torch.Tensor) -> np.ndarray:
    return image.permute(1, 2, 0).double().numpy()


def test_psnr_matches_skimage(generator):
    clean, noisy = _noisy_pair(generator)
    expected = [
        peak_signal_noise_ratio(_hwc(a), _hwc(b), data_range=1.0) for a, b in zip(clean, noisy, strict=True)
    ]
    np.testing.assert_allclose(psnr(clean, noisy).numpy(), expected, rtol=1e-10)
    # more noise -> lower PSNR, per image
    assert bool((psnr(clean, noisy).diff() < 0).all())


def test_ssim_matches_skimage(generator):
    clean, noisy = _noisy_pair(generator)
    expected = [
        structural_similarity(_hwc(a), _hwc(b), channel_axis=-1, data_range=1.0)
        for a, b in zip(clean, noisy, strict=True)
    ]
    np.testing.assert_allclose(ssim(clean, noisy).numpy(), expected, rtol=1e-12)


def test_identical_images_give_inf_psnr_and_unit_ssim(generator):
    images = torch.rand(2, 3, 16, 16, generator=generator)
    assert torch.isinf(psnr(images, images)).all() and (psnr(images, images) > 0).all()
    torch.testing.assert_close(ssim(images, images), torch.ones(2, dtype=torch.float64))


def test_masked_psnr_equals_psnr_of_selected_pixels(generator):
    clean, noisy = _noisy_pair(generator, batch=2)
    mask = torch.rand(2, 24, 24, generator=generator) > 0.6
    for index in range(2):
        selected_a = clean[index][:, mask[index]].double()  # (3, N)
        selected_b = noisy[index][:, mask[index]].double()
        mse = ((selected_a - selected_b) ** 2).mean().item()
        assert psnr(clean, noisy, mask)[index].item() == pytest.approx(10 * math.log10(1 / mse), rel=1e-12)


def test_masked_metrics_ignore_pixels_outside_the_mask(generator):
    clean, noisy = _noisy_pair(generator, batch=1)
    mask = torch.zeros(1, 24, 24, dtype=torch.bool)
    mask[:, :, :12] = True
    scrambled = noisy.clone()
    scrambled[..., 12:] = torch.rand(1, 3, 24, 12, generator=generator)
    # SSIM's 7x7 window reaches 3 pixels across the mask border, so keep those out for SSIM.
    ssim_mask = torch.zeros_like(mask)
    ssim_mask[:, :, :9] = True
    assert psnr(clean, noisy, mask).item() == psnr(clean, scrambled, mask).item()
    assert ssim(clean, noisy, ssim_mask).item() == ssim(clean, scrambled, ssim_mask).item()
    assert psnr(clean, noisy).item() != psnr(clean, scrambled).item()


def test_all_true_mask_equals_unmasked(generator):
    clean, noisy = _noisy_pair(generator)
    everything = torch.ones(3, 24, 24, dtype=torch.bool)
    torch.testing.assert_close(psnr(clean, noisy, everything), psnr(clean, noisy))
    torch.testing.assert_close(ssim(clean, noisy, everything), ssim(clean, noisy), rtol=1e-12, atol=0)


def test_empty_mask_gives_nan_for_that_image_only(generator):
    clean, noisy = _noisy_pair(generator, batch=2)
    mask = torch.ones(2, 24, 24, dtype=torch.bool)
    mask[1] = False
    for metric in (psnr, ssim):
        values = metric(clean, noisy, mask)
        assert torch.isfinite(values[0]) and torch.isnan(values[1])


def test_nan_pixels_give_nan_for_that_image_only(generator):
    clean, noisy = _noisy_pair(generator, batch=2)
    noisy[1, 0, 0, 0] = float("nan")
    for metric in (psnr, ssim):
        values = metric(clean, noisy)
        assert torch.isfinite(values[0]) and torch.isnan(values[1])


@pytest.mark.parametrize(
    ("images_b", "mask", "error", "message"),
    [
        (torch.rand(2, 3, 8, 8), None, ValueError, "same shape"),
        (torch.rand(2, 1, 16, 16), None, ValueError, r"\(B, 3, H, W\)"),
        ((torch.rand(2, 3, 16, 16) * 255).to(torch.uint8), None, TypeError, "floating-point"),
        (torch.rand(2, 3, 16, 16) * 2 - 1, None, ValueError, r"\[0, 1\]"),
        (torch.rand(2, 3, 16, 16), torch.ones(2, 16, 16), TypeError, "bool"),
        (torch.rand(2, 3, 16, 16), torch.ones(2, 1, 16, 16, dtype=torch.bool), ValueError, r"\(B, H, W\)"),
    ],
)
def test_bad_inputs_raise_clear_errors(images_b, mask, error, message):
    images_a = torch.rand(2, 3, 16, 16)
    for metric in (psnr, ssim):
        with pytest.raises(error, match=message):
            metric(images_a, images_b, mask)


def test_ssim_rejects_images_smaller_than_its_window():
    images = torch.rand(1, 3, 5, 5)
    with pytest.raises(ValueError, match="at least 7x7"):
        ssim(images, images)


def test_masked_mse_is_the_numpy_mean_over_the_selected_pixels(generator):
    from pipeline.metrics.pixel import mse

    clean, noisy = _noisy_pair(generator, batch=3)
    mask = torch.rand(3, 24, 24, generator=generator) > 0.6
    mask[2] = False  # an empty background: undefined, not 0 and not an error
    values = mse(clean, noisy, mask).numpy()
    for index in range(2):
        a, b = _hwc(clean[index]), _hwc(noisy[index])
        expected = np.mean((a[mask[index].numpy()] - b[mask[index].numpy()]) ** 2)
        assert values[index] == pytest.approx(expected, rel=1e-12)
    assert np.isnan(values[2])
    np.testing.assert_allclose(
        mse(clean, noisy).numpy(),
        [np.mean((_hwc(a) - _hwc(b)) ** 2) for a, b in zip(clean, noisy, strict=True)],
        rtol=1e-12,
    )
