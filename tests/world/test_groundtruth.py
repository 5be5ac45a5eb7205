"""Ground-truth-referenced edit error, checked against the generator's own guarantees."""

import numpy as np
import pytest
import torch

from pipeline.world import generator
from pipeline.world.groundtruth import edit_error, ground_truth_edit, shape_swap_edits


def test_the_counterfactual_itself_has_no_error():
    edits = shape_swap_edits(range(4))
    errors = edit_error(np.stack([edit.target.image for edit in edits]), edits)
    for values in errors.values():
        assert torch.isinf(values).all()


def test_an_unedited_image_errs_only_inside_the_changed_region():
    # The generator changes pixels only inside R, so the source equals the ground truth outside it.
    edits = shape_swap_edits(range(4))
    errors = edit_error(np.stack([edit.source.image for edit in edits]), edits)
    assert torch.isinf(errors["psnr_unchanged"]).all()
    assert torch.isfinite(errors["psnr_changed"]).all()
    assert (errors["psnr_all"] > errors["psnr_changed"]).all()


def test_shape_swap_changes_one_word_and_the_shape():
    for edit in shape_swap_edits(range(8)):
        source_words, target_words = edit.source.caption.split(), edit.target.caption.split()
        assert len(source_words) == len(target_words)
        assert sum(a != b for a, b in zip(source_words, target_words, strict=True)) == 1
        assert edit.target.scene.objects[0].shape == edit.value != edit.source.scene.objects[0].shape


def test_background_edit_region_excludes_the_objects():
    scene = generator.sample_scene(3, 0.0)
    value = next(b for b in generator.BACKGROUNDS if b != scene.background)
    edit = ground_truth_edit(scene, "background", value)
    assert not (edit.changed & edit.source.masks[0]).any()


def test_mismatched_counts_are_refused():
    edits = shape_swap_edits(range(2))
    with pytest.raises(ValueError, match="edited images"):
        edit_error(np.stack([edits[0].target.image]), edits)
