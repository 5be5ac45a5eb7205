"""Local blend against P2P's LocalBlend, on hand-made attention maps with known regions."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from pipeline.diffusion.masks import LocalBlend, MaskWords, composite, edit_mask, feathered_mask, word_mask

R = 4  # attention resolution
SIZE = 8  # latent side
L = 77


def _maps(regions: dict[tuple[int, int], list[tuple[int, int]]]) -> torch.Tensor:
    """(N, R*R, L) maps: row n's token t attends to the listed (y, x) cells, uniformly elsewhere a little."""
    maps = torch.full((2, R * R, L), 1e-3)
    for (row, token), cells in regions.items():
        for y, x in cells:
            maps[row, y * R + x, token] = 1.0
    return maps


def _latent_region(cells: list[tuple[int, int]], pool: bool) -> torch.Tensor:
    """The latent mask a word attending to `cells` gives: 3x3 max-pool (if pooled), nearest x2 upsampling."""
    grid = torch.zeros(R, R, dtype=torch.bool)
    for y, x in cells:
        grid[y, x] = True
    if pool:
        grid = torch.nn.functional.max_pool2d(grid[None, None].float(), 3, 1, 1)[0, 0].bool()
    return grid.repeat_interleave(SIZE // R, 0).repeat_interleave(SIZE // R, 1)


WORDS = MaskWords(
    source=[2], target=[3], source_exclude=[], target_exclude=[], threshold=0.3, exclude_threshold=0.3
)


def test_word_mask_pools_thresholds_and_resizes():
    maps = _maps({(0, 2): [(0, 0)]})
    assert torch.equal(word_mask(maps[0], [2], R, SIZE, 0.3), _latent_region([(0, 0)], pool=True))
    assert torch.equal(
        word_mask(maps[0], [2], R, SIZE, 0.3, pool=False), _latent_region([(0, 0)], pool=False)
    )
    assert not word_mask(maps[0], [], R, SIZE, 0.3).any()


def test_edit_mask_is_the_union_of_the_source_and_edit_rows_word_masks():
    """P2P: mask = mask[:1] + mask, the source row's word region or the edit row's."""
    maps = _maps({(0, 2): [(0, 0)], (1, 3): [(3, 3)]})
    mask = edit_mask(maps, 0, 1, WORDS, R, SIZE)
    expected = _latent_region([(0, 0)], pool=True) | _latent_region([(3, 3)], pool=True)
    assert torch.equal(mask, expected)


def test_exclude_words_remove_their_unpooled_region():
    """P2P's substruct_words: mask & ~(unpooled exclude mask of source | of edit)."""
    maps = _maps({(0, 2): [(0, 0), (0, 1), (1, 0), (1, 1)], (1, 5): [(0, 0)]})
    words = MaskWords(
        source=[2], target=[], source_exclude=[], target_exclude=[5], threshold=0.3, exclude_threshold=0.3
    )
    mask = edit_mask(maps, 0, 1, words, R, SIZE)
    expected = _latent_region([(0, 0), (0, 1), (1, 0), (1, 1)], pool=True) & ~_latent_region(
        [(0, 0)], pool=False
    )
    assert torch.equal(mask, expected)


def test_local_blend_starts_at_its_start_step_and_keeps_the_source_outside_the_mask():
    maps = _maps({(0, 2): [(0, 0)], (1, 3): [(0, 0)]})
    blend = LocalBlend(edit_rows=[1], source_rows=[0], words=[WORDS], start_step=[2], resolution=R, size=SIZE)
    latents = torch.randn(2, 4, SIZE, SIZE)
    for step in (0, 1):
        assert torch.equal(blend(step, latents.clone(), maps), latents)  # P2P: counter > int(0.2 * S)
    blended = blend(2, latents.clone(), maps)
    inside = _latent_region([(0, 0)], pool=True)
    torch.testing.assert_close(blended[1][:, ~inside], latents[0][:, ~inside])
    torch.testing.assert_close(blended[1][:, inside], latents[1][:, inside])
    torch.testing.assert_close(blended[0], latents[0])


def test_word_maps_are_normalised_by_their_maximum_and_thresholded_strictly():
    maps = _maps({(0, 2): [(0, 0)]}) * 4.0  # peak 4, background 4e-3
    maps[0, 1 * R + 1, 2] = 4.0 * 0.3  # exactly the threshold after normalisation: not in the mask
    mask = word_mask(maps[0], [2], R, SIZE, 0.3, pool=False)
    assert torch.equal(mask, _latent_region([(0, 0)], pool=False))


def test_source_exclude_words_are_unpooled_too():
    maps = _maps({(0, 2): [(0, 0), (0, 1), (1, 0), (1, 1)], (0, 5): [(0, 0)]})
    words = MaskWords(
        source=[2], target=[], source_exclude=[5], target_exclude=[], threshold=0.3, exclude_threshold=0.3
    )
    mask = edit_mask(maps, 0, 1, words, R, SIZE)
    expected = _latent_region([(0, 0), (0, 1), (1, 0), (1, 1)], pool=True) & ~_latent_region(
        [(0, 0)], pool=False
    )
    assert torch.equal(mask, expected)


def test_each_blended_edit_starts_at_its_own_step():
    maps = torch.cat([_maps({(0, 2): [(0, 0)], (1, 3): [(0, 0)]})] * 2)  # rows: src, edit, src, edit
    blend = LocalBlend(
        edit_rows=[1, 3], source_rows=[0, 2], words=[WORDS, WORDS], start_step=[5, 1], resolution=R, size=SIZE
    )
    latents = torch.randn(4, 4, SIZE, SIZE)
    blended = blend(2, latents.clone(), maps)
    torch.testing.assert_close(blended[1], latents[1])  # not started
    outside = ~_latent_region([(0, 0)], pool=True)
    torch.testing.assert_close(blended[3][:, outside], latents[2][:, outside])  # started


def test_a_faint_word_map_is_normalised_up_to_its_peak():
    maps = _maps({(0, 2): [(0, 0)]}) * 0.5  # peak 0.5
    maps[0, 1 * R + 1, 2] = 0.2  # 0.4 of the peak: inside the mask at threshold 0.3
    mask = word_mask(maps[0], [2], R, SIZE, 0.3, pool=False)
    assert torch.equal(mask, _latent_region([(0, 0), (1, 1)], pool=False))


def _chessboard_distance(mask: np.ndarray) -> np.ndarray:
    """Chebyshev distance of every pixel to the nearest mask pixel (scipy, independent of torch)."""
    return ndimage.distance_transform_cdt(~mask, metric="chessboard")


def _composite_case(seed: int = 0):
    rng = np.random.default_rng(seed)
    source = rng.integers(0, 256, size=(2, 3, 40, 40), dtype=np.uint8)
    edit = rng.integers(0, 256, size=(2, 3, 40, 40), dtype=np.uint8)
    mask = np.zeros((2, 40, 40), dtype=bool)
    mask[0, 12:20, 15:22] = True
    mask[1, 0:6, 30:40] = True  # touching the border
    mask[1, 25, 5] = True  # a single pixel
    return source, edit, mask


@pytest.mark.parametrize("dilation, feather", [(0, 0), (2, 0), (0, 3), (3, 4)])
def test_composite_keeps_the_source_exactly_outside_the_dilated_feathered_mask(dilation, feather):
    source, edit, mask = _composite_case()
    out = composite(
        torch.from_numpy(source), torch.from_numpy(edit), torch.from_numpy(mask), dilation, feather
    )
    out = out.numpy()
    assert out.dtype == np.uint8
    distance = np.stack([_chessboard_distance(m) for m in mask])[:, None].repeat(3, axis=1)
    outside = distance > dilation + feather
    inside = distance <= dilation
    assert outside.any() and inside.any()
    assert np.array_equal(out[outside], source[outside])  # byte for byte
    assert np.array_equal(out[inside], edit[inside])
    # The ramp: alpha = 1 - (d - dilation) / (feather + 1), the blend rounded to the uint8 grid.
    ramp = ~outside & ~inside
    alpha = 1.0 - (distance - dilation) / (feather + 1)
    expected = np.round(source + alpha * (edit.astype(np.float64) - source))
    np.testing.assert_array_equal(out[ramp], expected[ramp])


def test_feathered_mask_is_a_linear_ramp_in_chessboard_distance():
    _, _, mask = _composite_case()
    alpha = feathered_mask(torch.from_numpy(mask), dilation=2, feather=3).numpy()
    distance = np.stack([_chessboard_distance(m) for m in mask])
    expected = np.clip(1.0 - (distance - 2) / 4, 0.0, 1.0)
    np.testing.assert_allclose(alpha, expected, atol=1e-6)
    with pytest.raises(ValueError, match="feather must be >= 0"):
        feathered_mask(torch.from_numpy(mask), dilation=-1, feather=0)


def test_composite_of_float_images_is_exact_outside_and_an_empty_mask_returns_the_source():
    generator = torch.Generator().manual_seed(0)
    source, edit = (
        torch.rand(2, 3, 16, 16, generator=generator),
        torch.rand(2, 3, 16, 16, generator=generator),
    )
    mask = torch.zeros(2, 16, 16, dtype=torch.bool)
    mask[0, 5:8, 5:8] = True
    out = composite(source, edit, mask, dilation=1, feather=2)
    assert torch.equal(out[1], source[1])
    far = torch.ones(16, 16, dtype=torch.bool)
    far[1:12, 1:12] = False
    assert torch.equal(out[0][:, far], source[0][:, far])
    # Inside the dilated mask the edit's own values, not source + 1 * (edit - source) rounded in float
    # (0.7 + (1e-9 - 0.7) is 0 in float32), and outside the source's even where the edit is NaN.
    source[0, :, 6, 6], edit[0, :, 6, 6] = 0.7, 1e-9
    edit[0, :, 15, 15] = float("nan")
    out = composite(source, edit, mask, dilation=1, feather=2)
    assert torch.equal(out[0][:, 4:9, 4:9], edit[0][:, 4:9, 4:9])
    assert torch.equal(out[0][:, far], source[0][:, far])


def test_a_word_mask_of_no_words_is_an_empty_mask_of_the_latents_side():
    maps = torch.rand(16, 8)
    empty = word_mask(maps, [], resolution=4, size=6, threshold=0.3)
    assert empty.shape == (6, 6) and empty.dtype == torch.bool and not empty.any()


@pytest.mark.parametrize(
    ("edit", "mask", "message"),
    [
        (
            torch.zeros(2, 3, 4, 5),
            torch.zeros(2, 4, 4, dtype=torch.bool),
            r"source and edit .* \(2, 3, 4, 4\) torch.float32 and \(2, 3, 4, 5\) torch.float32",
        ),
        (
            torch.zeros(2, 3, 4, 4, dtype=torch.float64),
            torch.zeros(2, 4, 4, dtype=torch.bool),
            r"same shape and dtype, got \(2, 3, 4, 4\) torch.float32 and \(2, 3, 4, 4\) torch.float64",
        ),
        (
            torch.zeros(2, 3, 4, 4),
            torch.zeros(2, 4, 5, dtype=torch.bool),
            r"mask must be bool \(B, H, W\) matching the images, got \(2, 4, 5\) torch.bool",
        ),
        (
            torch.zeros(2, 3, 4, 4),
            torch.zeros(2, 4, 4),
            r"mask must be bool .* got \(2, 4, 4\) torch.float32",
        ),
    ],
)
def test_composite_refuses_mismatched_images_and_masks_naming_what_it_got(edit, mask, message):
    with pytest.raises(ValueError, match=message):
        composite(torch.zeros(2, 3, 4, 4), edit, mask, dilation=0, feather=0)
