"""The spread of an attribute over edits (pipeline.metrics.diversity.attribute_spread) against its
pairwise form and, for one-hot readings, the Gini impurity counted by hand."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from pipeline.metrics.diversity import attribute_spread


def test_the_spread_is_half_the_mean_squared_distance_over_all_ordered_pairs():
    probabilities = torch.randn(9, 6, generator=torch.Generator().manual_seed(0)).softmax(1)
    # sum_k Var_n(p_nk) = (1 / 2N^2) sum_{m, n} ||p_m - p_n||^2: a second form that never uses the mean
    pairwise = torch.cdist(probabilities.double(), probabilities.double()).square().sum() / (2 * 9**2)
    assert attribute_spread(probabilities) == pytest.approx(float(pairwise), rel=1e-12)


def test_one_hot_readings_spread_by_the_gini_impurity_of_the_values_read():
    read = ["red", "red", "green", "blue", "red", "green", "red", "orange"]
    values = ["red", "green", "blue", "yellow", "purple", "orange"]
    one_hot = torch.zeros(len(read), len(values))
    one_hot[torch.arange(len(read)), torch.tensor([values.index(value) for value in read])] = 1.0
    shares = [count / len(read) for count in Counter(read).values()]
    assert attribute_spread(one_hot) == pytest.approx(1 - sum(share**2 for share in shares))
    # The spread of one class's probability calls a set with no purple edit perfectly consistent; this
    # does not.
    assert float(one_hot[:, values.index("purple")].var(unbiased=False)) == 0.0
    assert attribute_spread(one_hot) > 0.5


def test_edits_read_alike_do_not_spread_and_the_shape_is_checked():
    alike = torch.tensor([0.1, 0.7, 0.2]).repeat(5, 1)
    assert attribute_spread(alike) == 0.0
    assert attribute_spread(alike[:1]) == 0.0
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        attribute_spread(alike[0])
    with pytest.raises(ValueError, match="N >= 1"):
        attribute_spread(alike[:0])
