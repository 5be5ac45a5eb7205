"""The oracle-size benchmark (benchmarks/oracle_sizes.py) with the shipped oracle: every shape, colour and
background counted, the zoom a no-op at the world's sizes, and the failure it exists for below them."""

from __future__ import annotations

from benchmarks import oracle_sizes
from pipeline.world import generator


def test_small_convex_shapes_read_as_stars_until_zoomed_and_world_sizes_are_left_alone():
    results = oracle_sizes.main(["--radii", "5", "14"])
    combinations = len(generator.BACKGROUNDS) * len(generator.COLORS)
    for radius in ("5", "14"):
        assert results[radius]["convex"]["scenes"] == 3 * combinations
        assert results[radius]["star"]["scenes"] == combinations
    for kind in ("convex", "star"):  # no zoom at the world's sizes: the same images, the same readings
        assert results["14"][kind]["right"] == results["14"][kind]["right_zoomed"]
    small = results["5"]["convex"]
    assert small["read_as_star"] > small["scenes"] / 2
    assert small["right_zoomed"] > 0.9 * small["scenes"] > small["right"]
