import math

import pytest

from topkast_cli.errors import UserError
from topkast_cli.sparsity import layer_counts
from topkast_cli.sparsity.distribution import backward_counts

SHAPES = {
    "conv1.weight": (16, 3, 3, 3),
    "conv2.weight": (32, 16, 3, 3),
    "conv3.weight": (64, 32, 3, 3),
    "fc1.weight": (256, 1024),
    "fc2.weight": (10, 256),
}


def test_uniform_rounds_each_layer():
    counts = layer_counts(SHAPES, 0.1, "uniform")
    for name, shape in SHAPES.items():
        assert counts[name] == round(0.1 * math.prod(shape))


@pytest.mark.parametrize("density", [0.02, 0.1, 0.2, 0.5, 0.9])
def test_erk_total_matches_and_no_layer_above_one(density):
    counts = layer_counts(SHAPES, density, "erk")
    total = sum(math.prod(s) for s in SHAPES.values())
    assert sum(counts.values()) == round(density * total)
    for name, shape in SHAPES.items():
        assert 0 <= counts[name] <= math.prod(shape)


def test_erk_gives_small_layers_more_density():
    counts = layer_counts(SHAPES, 0.1, "erk")
    dens = {n: counts[n] / math.prod(s) for n, s in SHAPES.items()}
    assert dens["conv1.weight"] > dens["conv3.weight"] > dens["fc1.weight"]


def test_erk_caps_layers_at_dense():
    # At 90% density the tiny first conv would exceed 1 and must be capped at exactly 1.
    counts = layer_counts(SHAPES, 0.9, "erk")
    assert counts["conv1.weight"] == math.prod(SHAPES["conv1.weight"])


def test_unknown_distribution_is_a_user_error():
    with pytest.raises(UserError, match="sparsity.distribution"):
        layer_counts(SHAPES, 0.1, "random")


def test_backward_counts_uniform_exact_and_erk_ratio_capped():
    kf = layer_counts(SHAPES, 0.1, "uniform")
    kb = backward_counts(SHAPES, kf, 0.1, 0.2, "uniform")
    for name, shape in SHAPES.items():
        assert kb[name] == round(0.2 * math.prod(shape))
    kf = layer_counts(SHAPES, 0.4, "erk")
    kb = backward_counts(SHAPES, kf, 0.4, 0.8, "erk")
    for name, shape in SHAPES.items():
        assert kb[name] == min(math.prod(shape), round(2 * kf[name]))
        assert kf[name] <= kb[name] <= math.prod(shape)
