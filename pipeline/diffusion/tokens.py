"""Prompts -> token embeddings, word -> token positions, and token maps between two prompts.

Legend (Prompt-to-Prompt, Hertz et al., §3.2):

    L                     the tokenizer's padded length (SD: 77); position 0 is the start token
    word_positions(...)   token positions of a word (P2P's get_word_inds)
    replacement_mapper    M (L x L): M_t(target)[.., j] = sum_i M_t(source)[.., i] * mapper[i, j], word swap
    refinement_mapper     A (L,) index + alpha (L,): target token j takes source token A[j] where
                          alpha[j] = 1 (aligned), its own map where alpha[j] = 0 (new words)
    equalizer             per-token scale c of attention re-weighting
"""

from __future__ import annotations

import difflib

import torch
from transformers import PreTrainedTokenizerBase

from pipeline.diffusion.errors import EngineInputError


def prompt_token_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, argument: str = "prompt") -> list[int]:
    """Token ids of `prompt` with start/end tokens, unpadded; raises if it exceeds the limit."""
    ids = tokenizer(prompt, truncation=False, add_special_tokens=True).input_ids
    if len(ids) > tokenizer.model_max_length:
        raise EngineInputError(
            f"{argument} {prompt!r} is {len(ids)} tokens long; the tokenizer's limit is "
            f"{tokenizer.model_max_length} including start and end tokens. Shorten the prompt."
        )
    return ids


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase,
    text_encoder: torch.nn.Module,
    prompts: list[str],
    argument: str = "prompt",
) -> torch.Tensor:
    """Token embeddings c = tau_theta(P), shape (B, L, D), in the text encoder's dtype/device."""
    for prompt in prompts:
        prompt_token_ids(tokenizer, prompt, argument)
    tokens = tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    device = next(text_encoder.parameters()).device
    with torch.no_grad():
        return text_encoder(tokens.input_ids.to(device))[0]


def split_words(prompt: str) -> list[str]:
    return prompt.strip().split()


def word_positions(tokenizer: PreTrainedTokenizerBase, prompt: str, word: str | int) -> list[int]:
    """Token positions (in the padded sequence) of every occurrence of `word` in `prompt`.

    Args:
        tokenizer: the model's tokenizer.
        prompt: the prompt.
        word: a whitespace-separated word of the prompt (case-insensitive), or a word index.
    """
    words = split_words(prompt)
    if isinstance(word, int):
        if not 0 <= word < len(words):
            raise EngineInputError(
                f"word index {word} is outside prompt {prompt!r}, which has {len(words)} words (0..{len(words) - 1})."
            )
        chosen = [word]
    else:
        chosen = [index for index, candidate in enumerate(words) if candidate.lower() == word.lower()]
    positions, cursor = [], 1
    for index, candidate in enumerate(words):
        count = len(tokenizer.encode(candidate, add_special_tokens=False))
        if index in chosen:
            positions.extend(range(cursor, cursor + count))
        cursor += count
    return [position for position in positions if position < tokenizer.model_max_length]


def replacement_mapper(tokenizer: PreTrainedTokenizerBase, source: str, target: str) -> torch.Tensor:
    """Word-swap map (L, L) from source tokens to target tokens.

    Words at equal positions that differ are swapped; a swapped word of n source tokens feeding m
    target tokens spreads each source token's map uniformly (1/m) over the m target tokens.

    Raises:
        EngineInputError: if the prompts have different word counts (use mode "refine").
    """
    source_words, target_words = split_words(source), split_words(target)
    if len(source_words) != len(target_words):
        raise EngineInputError(
            f"attention mode 'replace' swaps words and needs prompts of equal word count; source {source!r} has "
            f"{len(source_words)} words, target {target!r} has {len(target_words)}. Use mode 'refine'."
        )
    length = tokenizer.model_max_length
    mapper = torch.zeros(length, length)
    source_cursor, target_cursor = 1, 1
    mapper[0, 0] = 1.0
    for source_word, target_word in zip(source_words, target_words, strict=True):
        source_count = len(tokenizer.encode(source_word, add_special_tokens=False))
        target_count = len(tokenizer.encode(target_word, add_special_tokens=False))
        source_span = range(source_cursor, source_cursor + source_count)
        target_span = range(target_cursor, target_cursor + target_count)
        if source_word == target_word:
            for source_index, target_index in zip(source_span, target_span, strict=True):
                mapper[source_index, target_index] = 1.0
        else:
            for target_index in target_span:
                mapper[list(source_span), target_index] = 1.0 / target_count
        source_cursor, target_cursor = source_cursor + source_count, target_cursor + target_count
    # End token and padding: aligned from the end of each prompt onwards.
    for offset in range(length - max(source_cursor, target_cursor)):
        mapper[source_cursor + offset, target_cursor + offset] = 1.0
    return mapper


def refinement_mapper(
    tokenizer: PreTrainedTokenizerBase, source: str, target: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token alignment for prompts that add or remove words.

    Returns:
        mapper: (L,) long, the source position each target position copies its map from.
        alphas: (L,) float, 1 where the target token is aligned to a source token, 0 for new tokens.
    """
    length = tokenizer.model_max_length
    source_ids = tokenizer(source, padding="max_length", max_length=length, truncation=True).input_ids
    target_ids = tokenizer(target, padding="max_length", max_length=length, truncation=True).input_ids
    mapper = torch.arange(length)
    alphas = torch.zeros(length)
    matcher = difflib.SequenceMatcher(a=source_ids, b=target_ids, autojunk=False)
    for block in matcher.get_matching_blocks():
        for offset in range(block.size):
            mapper[block.b + offset] = block.a + offset
            alphas[block.b + offset] = 1.0
    return mapper, alphas


def equalizer(
    tokenizer: PreTrainedTokenizerBase, prompt: str, reweight: tuple[tuple[str | int, float], ...]
) -> torch.Tensor:
    """Per-token cross-attention scales (L,) for re-weighting words of `prompt`.

    Raises:
        EngineInputError: naming the word or index that is not in the prompt.
    """
    scales = torch.ones(tokenizer.model_max_length)
    for word, scale in reweight:
        positions = word_positions(tokenizer, prompt, word)
        if not positions:
            raise EngineInputError(
                f"reweight word {word!r} is not in the target prompt {prompt!r}; "
                f"choose one of its words: {split_words(prompt)}."
            )
        scales[positions] = float(scale)
    return scales
