import pytest
import torch

from pipeline.diffusion.control import step_window
from pipeline.diffusion.errors import EngineInputError
from pipeline.diffusion.tokens import (
    cross_window,
    equalizer,
    refinement_mapper,
    replacement_mapper,
    word_positions,
)


def test_word_positions_follow_clip_tokenization(tiny_sd):
    tokenizer = tiny_sd.tokenizer
    prompt = "a wheelchair on a road"
    ids = tokenizer(prompt).input_ids
    positions = word_positions(tokenizer, prompt, "road")
    assert tokenizer.decode([ids[p] for p in positions]).strip() == "road"
    assert word_positions(tokenizer, prompt, "a") == [1, 4]


def test_identical_prompts_give_identity_replacement(tiny_sd):
    mapper = replacement_mapper(tiny_sd.tokenizer, "a red circle", "a red circle")
    assert torch.equal(mapper, torch.eye(77))


def test_swapped_word_of_other_token_length_spreads_its_map(tiny_sd):
    tokenizer = tiny_sd.tokenizer
    source, target = "a cat on a road", "a wheelchairxyz on a road"
    mapper = replacement_mapper(tokenizer, source, target)
    target_span = word_positions(tokenizer, target, "wheelchairxyz")
    assert len(target_span) > 1
    cat = word_positions(tokenizer, source, "cat")[0]
    torch.testing.assert_close(
        mapper[cat, target_span], torch.full((len(target_span),), 1 / len(target_span))
    )
    road_source, road_target = (
        word_positions(tokenizer, source, "road")[0],
        word_positions(tokenizer, target, "road")[0],
    )
    assert mapper[road_source, road_target] == 1
    # each source token's attention is handed on whole (P2P spreads it 1/m over m target tokens);
    # the last source rows fall off the end because the target is longer
    shift = len(target_span) - 1
    assert torch.allclose(mapper.sum(1)[: 77 - shift], torch.ones(77 - shift))


def test_refinement_aligns_shared_tokens_and_marks_new_ones(tiny_sd):
    tokenizer = tiny_sd.tokenizer
    source, target = "a red circle", "a big red circle"
    mapper, alphas = refinement_mapper(tokenizer, source, target)
    big = word_positions(tokenizer, target, "big")[0]
    assert alphas[big] == 0
    red_source, red_target = (
        word_positions(tokenizer, source, "red")[0],
        word_positions(tokenizer, target, "red")[0],
    )
    assert alphas[red_target] == 1 and mapper[red_target] == red_source


def test_replace_needs_equal_word_counts(tiny_sd):
    with pytest.raises(EngineInputError, match="refine"):
        replacement_mapper(tiny_sd.tokenizer, "a red circle", "a big red circle")


def test_reweight_errors_name_the_word_or_index(tiny_sd):
    with pytest.raises(EngineInputError, match="reweight word 'blue' is not in the target prompt"):
        equalizer(tiny_sd.tokenizer, "a red circle", (("blue", 2.0),))
    with pytest.raises(EngineInputError, match="word index 7"):
        equalizer(tiny_sd.tokenizer, "a red circle", ((7, 2.0),))
    scales = equalizer(tiny_sd.tokenizer, "a red circle", ((1, 2.0),))
    assert scales[2] == 2.0 and scales.sum() == 77 + 1.0


def test_swapped_words_of_equal_token_length_map_one_to_one(tiny_sd):
    """P2P maps a swapped n-token word onto an n-token word token by token, not 1/n to each."""
    tokenizer = tiny_sd.tokenizer
    source, target = "a wheelchairxyz on a road", "a motorcyclexyz on a road"
    source_span = word_positions(tokenizer, source, "wheelchairxyz")
    target_span = word_positions(tokenizer, target, "motorcyclexyz")
    assert len(source_span) == len(target_span) > 1
    mapper = replacement_mapper(tokenizer, source, target)
    block = mapper[source_span][:, target_span]
    assert torch.equal(block, torch.eye(len(source_span)))


def test_refinement_maps_padding_position_to_position(tiny_sd):
    """A shorter target: its padding copies the source's maps at the same positions, alpha 1 (P2P)."""
    tokenizer = tiny_sd.tokenizer
    source, target = "a big red circle on a white background", "a red circle"
    mapper, alphas = refinement_mapper(tokenizer, source, target)
    target_length = len(tokenizer(target).input_ids)
    assert torch.equal(mapper[target_length:], torch.arange(target_length, 77))
    assert torch.equal(alphas, torch.ones(77))  # every target token is aligned to a source token
    end_source, end_target = len(tokenizer(source).input_ids) - 1, target_length - 1
    assert mapper[end_target] == end_source  # the end tokens align with each other
    # "red" and "circle" skip the removed "big"
    assert mapper[2] == 3 and mapper[3] == 4


def test_refinement_of_a_longer_target_marks_only_its_new_tokens(tiny_sd):
    tokenizer = tiny_sd.tokenizer
    mapper, alphas = refinement_mapper(tokenizer, "a red circle", "a red circle on a striped background")
    target_length = len(tokenizer("a red circle on a striped background").input_ids)
    assert alphas[:4].tolist() == [1, 1, 1, 1] and mapper[:4].tolist() == [0, 1, 2, 3]
    new = alphas[4 : target_length - 1]
    assert (new == 0).all(), alphas[:target_length]
    assert alphas[target_length - 1] == 1 and mapper[target_length - 1] == 4  # end token
    assert torch.equal(mapper[target_length:], torch.arange(target_length, 77))


def test_cross_window_spans_s_plus_one_entries_as_p2p_does(tiny_sd):
    tokenizer = tiny_sd.tokenizer
    steps = 10
    window = cross_window(tokenizer, "a red circle", 0.75, (), steps)
    assert window.shape == (steps, 77)
    # int(0.75 * 11) = 8 steps injected; int(0.75 * 10) = 7 would be the off-by-one
    assert window[:, 0].tolist() == [1.0] * 8 + [0.0] * 2
    window = cross_window(tokenizer, "a red circle", (0.2, 0.5), (), steps)
    assert window[:, 5].tolist() == [0.0] * 2 + [1.0] * 3 + [0.0] * 5


def test_cross_window_per_word_overrides_the_default(tiny_sd):
    tokenizer = tiny_sd.tokenizer
    window = cross_window(tokenizer, "a red circle", 0.8, (("circle", (0.0, 0.35)), ("red", 0.28)), 10)
    circle = word_positions(tokenizer, "a red circle", "circle")
    red = word_positions(tokenizer, "a red circle", "red")
    assert window[:, circle[0]].tolist() == [1.0] * 3 + [0.0] * 7  # int(0.35 * 11) = 3
    assert window[:, red[0]].tolist() == [1.0] * 3 + [0.0] * 7  # int(0.28 * 11) = 3, int(0.28 * 10) = 2
    other = word_positions(tokenizer, "a red circle", "a")
    assert window[:, other[0]].tolist() == [1.0] * 8 + [0.0] * 2
    with pytest.raises(EngineInputError, match="cross_replace_words 'square' is not in the target prompt"):
        cross_window(tokenizer, "a red circle", 0.8, (("square", 0.3),), 10)


def test_self_windows_span_s_entries():
    assert step_window(0.4, 10) == (0, 4)
    assert step_window(0.75, 10) == (0, 7)
    assert step_window((0.2, 0.5), 10) == (2, 5)


def test_word_indices_run_from_zero_to_the_last_word(tiny_sd):
    tokenizer = tiny_sd.tokenizer
    assert word_positions(tokenizer, "a red circle", 0) == [1]
    assert word_positions(tokenizer, "a red circle", 2) == [3]
    with pytest.raises(EngineInputError, match=r"has 3 words \(0\.\.2\)"):
        word_positions(tokenizer, "a red circle", 3)


def test_refinement_with_an_odd_number_of_inserted_tokens(tiny_sd):
    """Target-only moves one token at a time: three new tokens in the middle of the prompt."""
    tokenizer = tiny_sd.tokenizer
    source, target = "a circle on a gray background", "a circle in front of a gray background"
    mapper, alphas = refinement_mapper(tokenizer, source, target)
    source_ids, target_ids = tokenizer(source).input_ids, tokenizer(target).input_ids
    aligned = [j for j in range(len(target_ids)) if alphas[j] == 1]
    # every aligned target token copies an equal source token, in order, and the tokens left unaligned
    # are exactly the ones the source lacks
    assert [source_ids[mapper[j]] for j in aligned] == [target_ids[j] for j in aligned]
    assert [mapper[j] for j in aligned] == sorted(mapper[j] for j in aligned)
    new = [tokenizer.decode([target_ids[j]]).strip() for j in range(len(target_ids)) if alphas[j] == 0]
    assert new == ["in", "front", "of"] and len(aligned) == len(source_ids) - 1  # "on" dropped
