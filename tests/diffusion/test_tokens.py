import pytest
import torch

from pipeline.diffusion.errors import EngineInputError
from pipeline.diffusion.tokens import equalizer, refinement_mapper, replacement_mapper, word_positions


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
    with pytest.raises(EngineInputError, match="'blue'"):
        equalizer(tiny_sd.tokenizer, "a red circle", (("blue", 2.0),))
    with pytest.raises(EngineInputError, match="word index 7"):
        equalizer(tiny_sd.tokenizer, "a red circle", ((7, 2.0),))
    scales = equalizer(tiny_sd.tokenizer, "a red circle", ((1, 2.0),))
    assert scales[2] == 2.0 and scales.sum() == 77 + 1.0
