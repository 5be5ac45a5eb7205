import random

import pytest

from pipeline.methods.editor_windows import ALL_STEPS, heaviest_timestep


def brute_force_heaviest(gammas, windows, timesteps=1200):
    """Every timestep visited: the sum of the gammas whose window holds it."""
    totals = [
        sum(g for g, (low, high) in zip(gammas, windows, strict=True) if low <= t <= high)
        for t in range(timesteps)
    ]
    return max(totals)


def test_the_heaviest_timestep_matches_visiting_every_timestep():
    rng = random.Random(0)
    for _ in range(300):
        count = rng.randint(1, 5)
        windows = []
        for _ in range(count):
            low = rng.randint(0, 1100)
            windows.append((low, rng.randint(low, 1150)))
        gammas = [rng.choice((0.1, 0.25, 0.5, 0.7, 1.0)) for _ in range(count)]
        t, weight = heaviest_timestep(gammas, windows)
        assert weight == pytest.approx(brute_force_heaviest(gammas, windows))
        # The timestep returned carries that weight.
        assert weight == pytest.approx(
            sum(g for g, (low, high) in zip(gammas, windows, strict=True) if low <= t <= high)
        )


def test_touching_windows_do_not_overlap_and_shared_timesteps_do():
    assert heaviest_timestep((0.6, 0.6), ((201, 999), (0, 200)))[1] == 0.6
    assert heaviest_timestep((0.6, 0.6), ((200, 999), (0, 200))) == (200, 1.2)
    assert heaviest_timestep((0.3, 0.3, 0.3), (ALL_STEPS,) * 3)[1] == pytest.approx(0.9)
    assert heaviest_timestep((), ()) == (0, 0.0)


def test_a_window_per_editor_is_required():
    with pytest.raises(ValueError, match="one window per editor"):
        heaviest_timestep((0.5, 0.5), (ALL_STEPS,))
