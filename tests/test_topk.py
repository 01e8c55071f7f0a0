import torch

from topkast_cli.sparsity import topk_masks


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
