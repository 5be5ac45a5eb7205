import random

import pytest

from pipeline.methods.editor_windows import ALL_STEPS, check_weights, heaviest_timestep


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


@pytest.mark.parametrize(
    ("gammas", "windows", "combination", "message"),
    [
        ((0.7, 0.6), (ALL_STEPS, ALL_STEPS), "convex", r"active at t=0 weigh 1\.3 together"),
        ((0.6, 0.6), ((200, 999), (0, 200)), "convex", r"active at t=200 weigh 1\.2 together"),
        ((1.5,), (ALL_STEPS,), "convex", r"must each lie in \[0, 1\]"),
        ((-0.1,), (ALL_STEPS,), "convex", r"must each lie in \[0, 1\]"),
        ((float("nan"),), (ALL_STEPS,), "convex", r"must each lie in \[0, 1\]"),
        ((2.0, -0.1), (ALL_STEPS, ALL_STEPS), "conjunction", "finite and >= 0 in a conjunction"),
        ((float("nan"),), (ALL_STEPS,), "conjunction", "finite and >= 0 in a conjunction"),
        ((float("inf"),), (ALL_STEPS,), "conjunction", "finite and >= 0 in a conjunction"),
        ((0.5,), (ALL_STEPS,), "sum", "must be one of"),
        ((0.5, 0.5), (ALL_STEPS,), "conjunction", "one window per editor"),
    ],
)
def test_weights_that_do_not_suit_the_combination_are_refused(gammas, windows, combination, message):
    with pytest.raises(ValueError, match=message):
        check_weights(gammas, windows, combination)


def test_weights_that_suit_the_combination_pass():
    # Convex: each in [0, 1] and at most 1 at any one timestep (disjoint windows may each weigh 1).
    check_weights((0.7, 0.3), (ALL_STEPS, ALL_STEPS), "convex")
    check_weights((1.0, 1.0), ((201, 999), (0, 200)), "convex")
    check_weights((0.33, 0.56, 0.11), (ALL_STEPS,) * 3, "convex")  # sums to 1.0000000000000002
    # Conjunction: any finite non-negative weights, whatever their sum.
    check_weights((2.0, 1.0, 0.0), (ALL_STEPS,) * 3, "conjunction")
    check_weights((), (), "convex")
