"""Batch sizing from measured peak memory."""

import pytest

from pipeline.models.device import largest_batch

GIB = 2**30


def _affine(fixed: float, per_image: float, sizes) -> dict[int, int]:
    return {size: int(fixed + per_image * size) for size in sizes}


@pytest.mark.parametrize("sizes", [(1, 2), (1, 4, 8), (2, 3)])
def test_the_batch_returned_fits_and_one_more_image_would_not(sizes):
    fixed, per_image, capacity = 5.3 * GIB, 1.7 * GIB, 80 * GIB
    batch = largest_batch(_affine(fixed, per_image, sizes), capacity, headroom=0.9)
    assert fixed + per_image * batch <= 0.9 * capacity < fixed + per_image * (batch + 1)
    assert batch == 39  # (72 - 5.3) / 1.7 = 39.2


def test_noisy_measurements_are_fitted_by_least_squares():
    peaks = {1: 10 * GIB, 2: 12 * GIB + 2**20, 4: 16 * GIB - 2**20, 8: 24 * GIB}
    assert largest_batch(peaks, 100 * GIB, headroom=1.0) == 46  # (100 - 8) / 2


def test_a_fixed_part_larger_than_the_device_fits_nothing():
    assert largest_batch({1: 90 * GIB, 2: 91 * GIB}, 80 * GIB) == 0


@pytest.mark.parametrize("peaks", [{1: GIB}, {1: 2 * GIB, 2: 2 * GIB}, {1: 3 * GIB, 2: 2 * GIB}])
def test_unusable_measurements_are_refused(peaks):
    with pytest.raises(ValueError):
        largest_batch(peaks, 80 * GIB)
