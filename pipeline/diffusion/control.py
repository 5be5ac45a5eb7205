"""What a user asks of Prompt-to-Prompt / P2Plus for one edit, and the step windows it implies.

Imports no torch: the job spec validates these settings before any model is loaded.

Legend (Prompt-to-Prompt, Hertz et al. §3.2 and the reference `ptp_utils.py`; StyleDiffusion §3.4):

    S                       sampling steps; step i = 0..S-1 in sampling order (noise end first)
    tau_c                   `cross_replace_steps`: cross-attention maps of the edit row come from the
                            source row for steps in [int(start * (S + 1)), int(end * (S + 1)))
                            (P2P's `get_time_words_attention_alpha` spans S + 1 entries)
    tau_c(word)             `cross_replace_words`: the same window for the tokens of one target word
                            (P2P's dict form {"default_": tau_c, word: (start, end)})
    tau_s                   `self_replace_steps`: conditional self-attention copied from the source for
                            steps in [int(start * S), int(end * S))
    tau_u                   `unconditional_self_replace_steps` (P2Plus): unconditional self-attention
                            copied from the source, window as tau_s
    c                       `reweight`: per-word scale of the injected cross-attention (AttentionReweight)
    local blend             P2P's LocalBlend: words, substruct_words (`blend_exclude_words`), th = (word
                            threshold, exclude threshold), start_blend

A fraction f stands for the window (0, f).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ControlMode = Literal["none", "replace", "refine"]
CONTROL_MODES: tuple[str, ...] = ("none", "replace", "refine")
StepBounds = float | tuple[float, float]


@dataclass(frozen=True)
class AttentionControl:
    """Prompt-to-Prompt / P2Plus attention control for one edit.

    Attributes:
        mode: none (no word mapping: with `reweight`, P2P's AttentionReweight on the source maps;
            without, no cross- or self-attention injection) | replace (word swap, same word count) |
            refine (words added or removed).
        cross_replace_steps: tau_c, a fraction f = window (0, f) or a (start, end) pair of fractions.
        cross_replace_words: (word, window) pairs overriding tau_c for a word of the target prompt.
        self_replace_steps: tau_s, a fraction or (start, end).
        reweight: (word, scale) pairs scaling the injected cross-attention of a target word.
        blend_words: words whose cross-attention defines the local-blend mask; empty = no blend.
        blend_exclude_words: words whose region is removed from the blend mask (P2P's substruct_words).
        blend_threshold: threshold of the max-normalised, max-pooled word map.
        blend_exclude_threshold: threshold of the (unpooled) exclude-word map.
        blend_start: fraction of the steps before local blending starts (P2P's start_blend).
        unconditional_self_replace_steps: P2Plus tau_u, a fraction or (start, end); 0 = plain P2P.
    """

    mode: ControlMode = "replace"
    cross_replace_steps: StepBounds = 0.8
    cross_replace_words: tuple[tuple[str, StepBounds], ...] = ()
    self_replace_steps: StepBounds = 0.4
    reweight: tuple[tuple[str, float], ...] = ()
    blend_words: tuple[str, ...] = ()
    blend_exclude_words: tuple[str, ...] = ()
    blend_threshold: float = 0.3
    blend_exclude_threshold: float = 0.3
    blend_start: float = 0.2
    unconditional_self_replace_steps: StepBounds = 0.0

    @property
    def injects_cross_attention(self) -> bool:
        """Whether edit rows take any cross-attention from their source row."""
        return self.mode != "none" or bool(self.reweight)


def window_bounds(bounds: StepBounds) -> tuple[float, float]:
    """A fraction f -> (0, f); a (start, end) pair unchanged."""
    if isinstance(bounds, int | float):
        return 0.0, float(bounds)
    start, end = bounds
    return float(start), float(end)


def step_window(bounds: StepBounds, length: int) -> tuple[int, int]:
    """[first, last) step indices of a window over `length` entries: int(start * length), int(end * length)."""
    start, end = window_bounds(bounds)
    return int(start * length), int(end * length)


def check_bounds(bounds: StepBounds, where: str) -> str | None:
    """None if `bounds` is a valid window, else a message naming `where` and the fix."""
    start, end = window_bounds(bounds)
    if not 0.0 <= start <= end <= 1.0:
        return f"{where}={bounds!r} must be a fraction in [0, 1] or a pair 0 <= start <= end <= 1"
    return None
