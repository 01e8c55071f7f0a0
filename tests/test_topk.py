import math

import pytest
import torch

from topkast_cli.sparsity import topk, topk_masks


def test_exact_counts_and_nesting_with_ties():
    scores = torch.ones(10, 10)  # every score tied
    scores[0, :3] = 5.0
    forward, backward = topk_masks(scores, 7, 23)
    assert int(forward.sum()) == 7 and int(backward.sum()) == 23
    assert bool((backward | ~forward).all()), "A must be a subset of B"
    assert bool(forward[0, :3].all()), "the largest scores are always in A"


def test_masks_pick_the_largest_scores():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(1000, generator=g)
    forward, backward = topk_masks(scores, 100, 300)
    assert scores[forward].min() >= scores[~forward].max()
    assert scores[backward].min() >= scores[~backward].max()


def test_edge_counts():
    scores = torch.rand(4, 5)
    f, b = topk_masks(scores, 0, 0)
    assert not f.any() and not b.any()
    f, b = topk_masks(scores, 20, 20)
    assert f.all() and b.all()


def test_large_tensor_beyond_quantile_limit():
    # torch.quantile refuses tensors over 2**24 elements; top-k must not.
    scores = torch.zeros(2**24 + 10)
    scores[-5:] = 1.0
    f, b = topk_masks(scores, 5, 8)
    assert int(f.sum()) == 5 and int(b.sum()) == 8 and bool(f[-5:].all())


def _reference(flat, k):
    """The k largest by a full sort, ties to the lowest position (a stable descending sort)."""
    mask = torch.zeros(flat.shape, dtype=torch.bool)
    mask[torch.sort(flat, descending=True, stable=True).indices[:k]] = True
    return mask


@pytest.mark.parametrize(
    "make",
    [
        lambda g, n: torch.randn(n, generator=g).abs(),  # |θ|: the usual scores
        lambda g, n: torch.randint(0, 7, (n,), generator=g).float(),  # heavy ties at the threshold
        lambda g, n: torch.cat([torch.zeros(n - 1000), torch.rand(1000, generator=g)]),  # mostly zeros
        lambda g, n: torch.linspace(0, 1, n)[torch.randperm(n, generator=g)] ** 8,  # skewed
        lambda g, n: torch.randn(n, generator=g).masked_fill(torch.rand(n, generator=g) < 0.3, -math.inf),
    ],
    ids=["magnitudes", "ties", "zeros", "skewed", "minus-inf"],
)
@pytest.mark.parametrize("share", [0.0001, 0.05, 0.2, 0.5, 0.97])
@pytest.mark.parametrize("magnitude", [False, True])
def test_large_selection_is_exact_against_a_full_sort(make, share, magnitude, monkeypatch):
    # From LARGE on the k-th value is bracketed from a sample; the masks must still be
    # exactly those of a full sort (ties to the lowest positions), and nested.
    monkeypatch.setattr(topk, "LARGE", 1 << 16)
    monkeypatch.setattr(topk, "CHUNK", 10007)  # many chunks: ties are dropped across them, from the end
    g = torch.Generator().manual_seed(1)
    n = 4 * topk.SAMPLE + 7
    flat = make(g, n)
    k_backward = max(1, int(share * n))
    k_forward = k_backward // 2
    if magnitude:
        flat = flat - flat[torch.isfinite(flat)].mean()  # scores of both signs: |flat| ranks them
    forward, backward = topk_masks(flat, k_forward, k_backward, magnitude=magnitude)
    scores = flat.abs() if magnitude else flat
    assert torch.equal(backward, _reference(scores, k_backward))
    assert torch.equal(forward, _reference(scores, k_forward))
    assert bool((backward | ~forward).all())


def test_a_bracket_that_misses_falls_back_to_the_exact_value(monkeypatch):
    monkeypatch.setattr(topk, "SAMPLE", 16)  # a sample too small to bracket reliably
    monkeypatch.setattr(topk, "LARGE", 1000)
    g = torch.Generator().manual_seed(2)
    flat = torch.randn(5000, generator=g) ** 3
    for k in (1, 17, 1000, flat.numel() - 3):
        assert torch.equal(topk.top_masks(flat, [k])[0], _reference(flat, k))


def test_nan_scores_count_as_largest_like_topk():
    scores = torch.rand(50)
    scores[[3, 9]] = math.nan
    f, b = topk_masks(scores, 2, 5)
    assert bool(f[[3, 9]].all()) and int(f.sum()) == 2 and int(b.sum()) == 5
