"""Timestep windows of eq. 14's weights gamma_i(t) (DiffusionCLIP, papers/004), without torch.

The job spec (which must load where torch is absent) and the edit (`diffusion_clip.windowed_gammas`)
share one check: at every timestep the editors active there weigh at most 1 together, so that the
original model's share 1 - sum_i gamma_i(t) stays in [0, 1].

Legend:
    gammas  -- gamma_i, editor i's weight inside its window (eq. 14)
    windows -- [low_i, high_i], inclusive timesteps where editor i weighs gamma_i; 0 outside
"""

from __future__ import annotations

from collections.abc import Sequence

Window = tuple[int, int]
ALL_STEPS: Window = (0, 10**9)


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
