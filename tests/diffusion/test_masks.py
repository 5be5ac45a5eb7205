"""Local blend against P2P's LocalBlend, on hand-made attention maps with known regions."""

import torch

from pipeline.diffusion.masks import LocalBlend, MaskWords, edit_mask, word_mask

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
