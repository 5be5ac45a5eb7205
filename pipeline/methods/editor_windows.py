"""Timestep windows of eq. 14's weights gamma_i(t) (DiffusionCLIP, papers/004), without torch.

The job spec (which must load where torch is absent) and the edit (`diffusion_clip.windowed_gammas`)
share one check, `check_weights`: in a convex combination (eq. 14) every gamma lies in [0, 1] and at
every timestep the editors active there weigh at most 1 together, so that the original model's share
1 - sum_i gamma_i(t) stays in [0, 1]; in a conjunction (eps + sum_i gamma_i (eps_i - eps), not in the
paper) every gamma is finite and >= 0, whatever their sum.

Legend:
    gammas  -- gamma_i, editor i's weight inside its window (eq. 14)
    windows -- [low_i, high_i], inclusive timesteps where editor i weighs gamma_i; 0 outside
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

Window = tuple[int, int]
ALL_STEPS: Window = (0, 10**9)
Combination = Literal["convex", "conjunction"]
COMBINATIONS: tuple[Combination, ...] = ("convex", "conjunction")
# Rounding (0.7 + 0.3 written as decimals) must not refuse weights that sum to 1.
SUM_TOLERANCE = 1e-6


def check_weights(gammas: Sequence[float], windows: Sequence[Window], combination: Combination) -> None:
    """Refuse weights that do not suit the combination, naming the fix.

    Args:
        gammas: M weights.
        windows: M inclusive windows (low, high); `ALL_STEPS` for an editor active at every step.
        combination: "convex" (eq. 14) or "conjunction".

    Raises:
        ValueError: an unknown combination; counts differ; in a conjunction a gamma that is negative, NaN
            or infinite; in a convex combination a gamma outside [0, 1] or a timestep where the active
            editors weigh more than 1 together.
    """
    if combination not in COMBINATIONS:
        raise ValueError(f"combination={combination!r} must be one of {list(COMBINATIONS)}")
    if len(gammas) != len(windows):
        raise ValueError(f"need one window per editor: {len(gammas)} gammas, {len(windows)} windows")
    if combination == "conjunction":
        if not all(gamma >= 0.0 and math.isfinite(gamma) for gamma in gammas):
            raise ValueError(f"editors' gammas {list(gammas)} must be finite and >= 0 in a conjunction")
        return
    if not all(0.0 <= gamma <= 1.0 for gamma in gammas):
        raise ValueError(
            f"editors' gammas {list(gammas)} must each lie in [0, 1] and sum to at most 1 (eq. 14), "
            "or set combination: conjunction to add each editor's change in full"
        )
    worst, heaviest = heaviest_timestep(gammas, windows)
    if heaviest > 1.0 + SUM_TOLERANCE:
        raise ValueError(
            f"the editors active at t={worst} weigh {heaviest:.6g} together; at every t their gammas must "
            "sum to at most 1 (eq. 14), or set combination: conjunction to add each editor's change in full"
        )


def heaviest_timestep(gammas: Sequence[float], windows: Sequence[Window]) -> tuple[int, float]:
    """The timestep where the active editors weigh most together, and that weight.

    A sum of interval indicators is largest at the start of one of the intervals, so only the windows'
    low ends are visited: O(M^2) for M editors, whatever the number of timesteps.

    Args:
        gammas: M weights.
        windows: M inclusive windows (low, high).

    Returns:
        (t, sum of the gammas of the editors whose window holds t); (0, 0.0) without editors.
    """
    if len(gammas) != len(windows):
        raise ValueError(f"need one window per editor: {len(gammas)} gammas, {len(windows)} windows")
    best = (0, 0.0)
    for start, _ in windows:
        total = sum(gamma for gamma, (low, high) in zip(gammas, windows, strict=True) if low <= start <= high)
        if total > best[1]:
            best = (start, total)
    return best
