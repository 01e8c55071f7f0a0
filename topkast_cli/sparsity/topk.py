"""Exact top-k masks by magnitude."""

from __future__ import annotations

import math

import torch


SAMPLE = 65536  # scores sampled to bracket the k-th largest one
EXACT_BELOW = 1 << 18  # smaller tensors: an exact k-th value over all of them
CHUNK = 1 << 20  # scores compared per pass, so that no temporary is of the whole layer's size


def _chunks(flat: torch.Tensor, magnitude: bool):
    """(offset, scores) of consecutive pieces of `flat`; |flat| where `magnitude`."""
    for i in range(0, flat.numel(), CHUNK):
        piece = flat[i : i + CHUNK]
        yield i, piece.abs() if magnitude else piece


def _all(flat: torch.Tensor, magnitude: bool) -> torch.Tensor:
    return flat.abs() if magnitude else flat


def kth_largest(flat: torch.Tensor, k: int, magnitude: bool = False) -> torch.Tensor:
    """The k-th largest value of a 1-D tensor (of its magnitudes where `magnitude`; 1 <= k <=
    numel), exactly.

    `torch.topk` with k in the millions is slow and needs index arrays of k int64s. Instead a
    fixed random sample brackets the value between two of its order statistics, a count
    checks the bracket, and the exact value is the right order statistic of the few scores
    inside it. A bracket that misses (an odd distribution) falls back to `kthvalue`.
    """
    n = flat.numel()
    if n <= EXACT_BELOW:
        return torch.kthvalue(_all(flat, magnitude), n - k + 1).values
    # A fixed generator: the same scores give the same bracket, and the global stream is untouched.
    g = torch.Generator().manual_seed(n)
    sample = _all(flat[torch.randint(n, (SAMPLE,), generator=g).to(flat.device)], magnitude)
    sample = sample.sort(descending=True).values
    share = k / n
    spread = 6 * math.sqrt(SAMPLE * share * (1 - share)) + 16  # binomial standard deviations, and then some
    hi = sample[max(0, int(share * SAMPLE - spread))]
    lo = sample[min(SAMPLE - 1, int(share * SAMPLE + spread))]
    above = sum(int(torch.count_nonzero(c > hi)) for _, c in _chunks(flat, magnitude))
    if above < k:
        band = torch.cat([c[(c >= lo) & (c <= hi)] for _, c in _chunks(flat, magnitude)])
        if band.numel() >= k - above:
            return torch.kthvalue(band, band.numel() - (k - above) + 1).values
    return torch.kthvalue(_all(flat, magnitude), n - k + 1).values


def top_mask(flat: torch.Tensor, k: int, magnitude: bool = False) -> torch.Tensor:
    """Bool mask of exactly the k largest entries of a 1-D tensor (largest magnitudes where
    `magnitude`: no |θ| of the layer's size is made); among scores equal to the k-th largest,
    the lowest positions win (the same rule at every k, so the masks nest)."""
    n = flat.numel()
    if k == 0 or k == n:
        return torch.full(flat.shape, k == n, dtype=torch.bool, device=flat.device)
    if bool(torch.isnan(flat.max())):  # NaN scores count as the largest, as in torch.topk
        mask = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
        mask[torch.topk(_all(flat, magnitude), k, sorted=False).indices] = True
        return mask
    value = kth_largest(flat, k, magnitude)
    mask = torch.empty(flat.shape, dtype=torch.bool, device=flat.device)
    for i, c in _chunks(flat, magnitude):
        torch.ge(c, value, out=mask[i : i + c.numel()])
    extra = int(torch.count_nonzero(mask)) - k  # ties at the k-th value beyond k: the last ones go
    if extra:
        ties = torch.cat([(c == value).nonzero().squeeze(1) + i for i, c in _chunks(flat, magnitude)])
        mask[ties[ties.numel() - extra :]] = False
    return mask


def topk_masks(scores: torch.Tensor, k_forward: int, k_backward: int, magnitude: bool = False):
    """Boolean masks of the k_forward and k_backward largest scores (largest |scores| where
    `magnitude`).

    Each holds exactly k entries whatever the ties, and A ⊆ B: both break ties by position,
    so the k_forward largest are among the k_backward largest (a plain threshold would give
    more than k on ties; quantile also fails above 2^24 elements). A selection costs a few
    passes over the scores and no index arrays (see `kth_largest`).
    """
    if not 0 <= k_forward <= k_backward <= scores.numel():
        raise ValueError(f"need 0 <= k_forward ({k_forward}) <= k_backward ({k_backward}) <= {scores.numel()}")
    flat = scores.reshape(-1)
    backward = top_mask(flat, k_backward, magnitude)
    forward = top_mask(flat, k_forward, magnitude) if k_forward < k_backward else backward.clone()
    return forward.view_as(scores), backward.view_as(scores)


def topk_mask(scores: torch.Tensor, k: int, magnitude: bool = False) -> torch.Tensor:
    """Boolean mask of exactly the k largest scores (|scores| where `magnitude`)."""
    if not 0 <= k <= scores.numel():
        raise ValueError(f"need 0 <= k ({k}) <= {scores.numel()}")
    return top_mask(scores.reshape(-1), k, magnitude).view_as(scores)


def topk_masks_every_row(scores: torch.Tensor, k_forward: int, k_backward: int):
    """`topk_masks`, except that every row (dim 0: a layer's output unit or channel) keeps its
    largest score in A, so no unit is cut off; the rest of A and B are the largest of the
    others. Still exactly k_forward and k_backward entries, A ⊆ B; the same masks as
    `topk_masks` whenever the top k_forward already reach every row. With fewer entries than
    rows (k_forward < rows), A holds the best entry of the k_forward best rows."""
    if not 0 <= k_forward <= k_backward <= scores.numel():
        raise ValueError(f"need 0 <= k_forward ({k_forward}) <= k_backward ({k_backward}) <= {scores.numel()}")
    rows = scores.reshape(scores.shape[0], -1)
    best, where = rows.max(dim=1)
    chosen = torch.topk(best, min(k_forward, rows.shape[0]), sorted=False).indices
    kept = torch.zeros(rows.shape, dtype=torch.bool, device=rows.device)
    kept[chosen, where[chosen]] = True
    rest = rows.masked_fill(kept, -math.inf)
    extra_forward, extra_backward = topk_masks(rest, k_forward - len(chosen), k_backward - len(chosen))
    return (kept | extra_forward).view_as(scores), (kept | extra_backward).view_as(scores)
