"""Prompts -> token embeddings, word -> token positions, and token maps between two prompts.

Legend (Prompt-to-Prompt, Hertz et al., §3.2):

    L                     the tokenizer's padded length (SD: 77); position 0 is the start token
    word_positions(...)   token positions of a word (P2P's get_word_inds)
    replacement_mapper    M (L x L): M_t(target)[.., j] = sum_i M_t(source)[.., i] * mapper[i, j], word swap
                          (P2P `get_replacement_mapper`): a swapped word of n source tokens and m target
                          tokens maps one to one when n == m, else each source token 1/m to every target
                          token of the word
    refinement_mapper     A (L,) index + alpha (L,): target token j takes source token A[j] where
                          alpha[j] = 1 (aligned), its own map where alpha[j] = 0 (new words). The
                          alignment is P2P's `seq_aligner` global alignment of the unpadded token ids
                          (gap 0, match 1, mismatch -1; ties prefer a target-only gap, then a
                          source-only gap, then the diagonal); padding maps position to position, alpha 1
    cross_window          (S, L) 0/1: token j of the target is injected at step i (P2P's
                          `get_time_words_attention_alpha`, default window and per-word windows)
    equalizer             per-token scale c of attention re-weighting

Deliberate difference from P2P's replacement mapper: after the last swapped word P2P maps target
position j from source position j, which misaligns the rest of the prompt when the swapped words have
different token counts; here the tokens after a swap stay aligned word by word.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from pipeline.diffusion.control import StepBounds, step_window
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

    Words at equal positions that differ are swapped. A swapped word of n source tokens and m target
    tokens maps token k to token k when n == m; otherwise each source token's map is spread uniformly
    (1/m) over the m target tokens.

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
        if source_count == target_count:
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
    """Token alignment for prompts that add or remove words (P2P's refinement mapper).

    Returns:
        mapper: (L,) long, the source position each target position copies its map from (0 where the
            target token is new; its alpha is 0 so the value is unused).
        alphas: (L,) float, 1 where the target token is aligned to a source token or is padding, 0 for
            new tokens.
    """
    length = tokenizer.model_max_length
    source_ids = tokenizer(source, truncation=True, max_length=length).input_ids
    target_ids = tokenizer(target, truncation=True, max_length=length).input_ids
    aligned = _global_alignment(source_ids, target_ids)
    mapper = torch.arange(length)
    alphas = torch.ones(length)
    for target_index, source_index in enumerate(aligned):
        mapper[target_index] = max(source_index, 0)
        alphas[target_index] = float(source_index >= 0)
    return mapper, alphas


def _global_alignment(source: list[int], target: list[int]) -> list[int]:
    """For each target token, the source token it is aligned to, or -1 (Needleman-Wunsch).

    Scores: gap 0, match 1, mismatch -1. Ties prefer consuming a target token alone, then a source
    token alone, then the diagonal, as P2P's `seq_aligner.global_align` does.
    """
    rows, cols = len(source), len(target)
    score = [[0] * (cols + 1) for _ in range(rows + 1)]
    move = [[0] * (cols + 1) for _ in range(rows + 1)]  # 1 target-only, 2 source-only, 3 diagonal
    for j in range(1, cols + 1):
        move[0][j] = 1
    for i in range(1, rows + 1):
        move[i][0] = 2
        for j in range(1, cols + 1):
            target_only, source_only = score[i][j - 1], score[i - 1][j]
            diagonal = score[i - 1][j - 1] + (1 if source[i - 1] == target[j - 1] else -1)
            best = max(target_only, source_only, diagonal)
            score[i][j] = best
            move[i][j] = 1 if best == target_only else 2 if best == source_only else 3
    aligned = [-1] * cols
    i, j = rows, cols
    while i > 0 or j > 0:
        step = move[i][j]
        if step == 3:
            i, j = i - 1, j - 1
            aligned[j] = i
        elif step == 1:
            j -= 1
        else:
            i -= 1
    return aligned


def target_word_positions(
    tokenizer: PreTrainedTokenizerBase, target: str, word: str | int, what: str
) -> list[int]:
    """`word_positions` of a word the caller requires in the target prompt.

    Raises:
        EngineInputError: naming `what`, the word and the prompt's words.
    """
    positions = word_positions(tokenizer, target, word)
    if not positions:
        raise EngineInputError(
            f"{what} {word!r} is not in the target prompt {target!r}; choose one of its words: {split_words(target)}."
        )
    return positions


def cross_window(
    tokenizer: PreTrainedTokenizerBase,
    target: str,
    default: StepBounds,
    per_word: tuple[tuple[str, StepBounds], ...],
    num_steps: int,
) -> torch.Tensor:
    """(S, L) 0/1 cross-attention injection windows per step and target token.

    The windows are taken over S + 1 entries as in P2P: a fraction f injects steps i < int(f * (S + 1)).

    Raises:
        EngineInputError: naming a `per_word` word that is not in the target prompt.
    """
    windows = torch.zeros(num_steps + 1, tokenizer.model_max_length)
    first, last = step_window(default, num_steps + 1)
    windows[first:last] = 1.0
    for word, bounds in per_word:
        positions = target_word_positions(tokenizer, target, word, "cross_replace_words")
        first, last = step_window(bounds, num_steps + 1)
        windows[:, positions] = 0.0
        windows[first:last, positions] = 1.0
    return windows[:num_steps]


def equalizer(
    tokenizer: PreTrainedTokenizerBase, prompt: str, reweight: tuple[tuple[str | int, float], ...]
) -> torch.Tensor:
    """Per-token cross-attention scales (L,) for re-weighting words of `prompt`.

    Raises:
        EngineInputError: naming the word or index that is not in the prompt.
    """
    scales = torch.ones(tokenizer.model_max_length)
    for word, scale in reweight:
        positions = target_word_positions(tokenizer, prompt, word, "reweight word")
        scales[positions] = float(scale)
    return scales
