"""Structure distance: zero for the same layout, blind to appearance changes that keep the tokens'
directions, and equal to a loop written from the definition."""

import torch

from pipeline.metrics.structure import structure_distance


def _by_definition(tokens_a, tokens_b):
    distances = []
    for a, b in zip(tokens_a, tokens_b, strict=True):
        n = a.shape[0]
        total = 0.0
        for i in range(n):
            for j in range(n):
                cos_a = torch.dot(a[i], a[j]) / (a[i].norm() * a[j].norm())
                cos_b = torch.dot(b[i], b[j]) / (b[i].norm() * b[j].norm())
                total += float(cos_a - cos_b) ** 2
        distances.append(total / n**2)
    return torch.tensor(distances)


def test_structure_distance_matches_the_definition_and_ignores_per_token_scale():
    generator = torch.Generator().manual_seed(0)
    tokens_a = torch.randn(2, 6, 5, generator=generator)
    tokens_b = torch.randn(2, 6, 5, generator=generator)
    torch.testing.assert_close(structure_distance(tokens_a, tokens_b), _by_definition(tokens_a, tokens_b))
    scaled = tokens_a * torch.rand(2, 6, 1, generator=generator).add(0.5)
    torch.testing.assert_close(structure_distance(tokens_a, scaled), torch.zeros(2), atol=1e-6, rtol=0)
    shuffled = tokens_a[:, torch.randperm(6, generator=generator)]
    assert (structure_distance(tokens_a, shuffled) > 1e-3).all()
