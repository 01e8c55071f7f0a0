"""Exact top-k masks by magnitude.

Below `LARGE` entries a layer's masks come from `torch.topk` (A picked among B's entries).
From `LARGE` on, `torch.topk` gets slow (0.75 s for 16.8M entries on 2 CPU cores) and its
index arrays and work space set a refresh's memory peak, so the masks come from an exact
k-th value found through a sampled bracket and a few passes over the scores in chunks
(0.17 s, no temporary of the layer's size). Both give exactly k entries and A ⊆ B; where
the k-th value is tied they may pick different entries (the bracket: the lowest positions).
"""

from __future__ import annotations

import math

import torch


LARGE = 1 << 20  # from this many entries on, the bracket instead of torch.topk
SAMPLE = 65536  # scores sampled to bracket the k-th largest one
CHUNK = 1 << 20  # scores compared per pass, so that no temporary is of the whole layer's size


def _chunks(flat: torch.Tensor, magnitude: bool):
    """(offset, scores) of consecutive pieces of `flat`; |flat| where `magnitude`."""
    for i in range(0, flat.numel(), CHUNK):
        piece = flat[i : i + CHUNK]
        yield i, piece.abs() if magnitude else piece


def _all(flat: torch.Tensor, magnitude: bool) -> torch.Tensor:
    return flat.abs() if magnitude else flat


def kth_largest(flat: torch.Tensor, ks: list[int], magnitude: bool = False) -> list[torch.Tensor]:
    """The k-th largest value of a 1-D tensor (of its magnitudes where `magnitude`) for each k
    in `ks` (1 <= k <= numel), exactly.

    `torch.topk` with k in the millions is slow and needs index arrays of k int64s. Instead a
    fixed random sample brackets each value between two of its order statistics, one pass
    over the scores counts what lies above each bracket and keeps what lies inside, and the
    exact value is the right order statistic of those few. A bracket that misses (an odd
    distribution) falls back to `kthvalue`.
    """
    n = flat.numel()
    if n <= 4 * SAMPLE:  # too few for a sample to save anything
        scores = _all(flat, magnitude)
        return [torch.kthvalue(scores, n - k + 1).values for k in ks]
    # A fixed generator: the same scores give the same brackets, and the global stream is untouched.
    g = torch.Generator().manual_seed(n)
    sample = _all(flat[torch.randint(n, (SAMPLE,), generator=g).to(flat.device)], magnitude)
    sample = sample.sort(descending=True).values
    brackets = []
    for k in ks:
        share = k / n
        spread = 6 * math.sqrt(SAMPLE * share * (1 - share)) + 16  # binomial standard deviations, and then some
        brackets.append((sample[max(0, int(share * SAMPLE - spread))], sample[min(SAMPLE - 1, int(share * SAMPLE + spread))]))
    above, bands = [0] * len(ks), [[] for _ in ks]
    for _, c in _chunks(flat, magnitude):
        for j, (hi, lo) in enumerate(brackets):
            above[j] += int(torch.count_nonzero(c > hi))
            bands[j].append(c[(c >= lo) & (c <= hi)])
    values = []
    for k, count, band in zip(ks, above, bands):
        band = torch.cat(band)
        if count < k <= count + band.numel():
            values.append(torch.kthvalue(band, band.numel() - (k - count) + 1).values)
        else:
            values.append(torch.kthvalue(_all(flat, magnitude), n - k + 1).values)
    return values


def top_masks(flat: torch.Tensor, ks: list[int], magnitude: bool = False) -> list[torch.Tensor]:
    """Bool masks of exactly the k largest entries of a 1-D tensor for each k in `ks` (largest
    magnitudes where `magnitude`: from `LARGE` entries on no |θ| of the layer's size is made,
    and two passes over it do); among scores equal to the k-th largest the lowest positions
    win there, so the masks nest."""
    n = flat.numel()
    masks = [torch.full(flat.shape, k == n, dtype=torch.bool, device=flat.device) for k in ks]
    todo = [j for j, k in enumerate(ks) if 0 < k < n]
    if not todo:
        return masks
    if n < LARGE or bool(torch.isnan(flat.max())):  # NaN scores count as the largest, as in torch.topk
        scores, chosen = _all(flat, magnitude), None
        for j in sorted(todo, key=lambda j: -ks[j]):  # each set picked among the entries of the larger one
            pick = torch.topk(scores if chosen is None else scores[chosen], ks[j], sorted=False).indices
            chosen = pick if chosen is None else chosen[pick]
            masks[j][chosen] = True
        return masks
    values = kth_largest(flat, [ks[j] for j in todo], magnitude)
    for i, c in _chunks(flat, magnitude):
        for j, value in zip(todo, values):
            torch.ge(c, value, out=masks[j][i : i + c.numel()])
    for j, value in zip(todo, values):
        # Ties at the k-th value beyond k: the last ones go, found from the end (rarely more
        # than the last chunk is read).
        extra = int(torch.count_nonzero(masks[j])) - ks[j]
        for i in reversed(range(0, n, CHUNK)) if extra else ():
            piece = flat[i : i + CHUNK]
            tied = ((piece.abs() if magnitude else piece) == value).nonzero().squeeze(1)[-extra:]
            masks[j][tied + i] = False
            extra -= tied.numel()
            if not extra:
                break
    return masks


def topk_masks(scores: torch.Tensor, k_forward: int, k_backward: int, magnitude: bool = False):
    """Boolean masks of the k_forward and k_backward largest scores (largest |scores| where
    `magnitude`).

    Each holds exactly k entries whatever the ties, and A ⊆ B: both break ties by position,
    so the k_forward largest are among the k_backward largest (a plain threshold would give
    more than k on ties; quantile also fails above 2^24 elements). Both come from the same
    two passes over the scores, without index arrays (see `kth_largest`).
    """
    if not 0 <= k_forward <= k_backward <= scores.numel():
        raise ValueError(f"need 0 <= k_forward ({k_forward}) <= k_backward ({k_backward}) <= {scores.numel()}")
    flat = scores.reshape(-1)
    if k_forward == k_backward:
        backward = top_masks(flat, [k_backward], magnitude)[0]
        forward = backward.clone()
    else:
        forward, backward = top_masks(flat, [k_forward, k_backward], magnitude)
    return forward.view_as(scores), backward.view_as(scores)


def topk_mask(scores: torch.Tensor, k: int, magnitude: bool = False) -> torch.Tensor:
    """Boolean mask of exactly the k largest scores (|scores| where `magnitude`)."""
    if not 0 <= k <= scores.numel():
        raise ValueError(f"need 0 <= k ({k}) <= {scores.numel()}")
    return top_masks(scores.reshape(-1), [k], magnitude)[0].view_as(scores)


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


def topk_masks_in_groups(scores: torch.Tensor, group: int, k_forward: int, k_backward: int):
    """`topk_masks` within every `group` consecutive entries of the flat scores (N:M): each
    group holds exactly k_forward entries of A and k_backward of B, A ⊆ B (A: the first
    k_forward of the group's k_backward largest, in descending order)."""
    if scores.numel() % group or not 0 <= k_forward <= k_backward <= group:
        raise ValueError(f"need groups of {group} dividing {scores.numel()} and 0 <= {k_forward} <= {k_backward} <= {group}")
    groups = scores.reshape(-1, group)
    order = torch.topk(groups, k_backward, dim=1, sorted=True).indices
    forward = torch.zeros(groups.shape, dtype=torch.bool, device=scores.device)
    backward = forward.clone()
    forward.scatter_(1, order[:, :k_forward], True)
    backward.scatter_(1, order, True)
    return forward.view_as(scores), backward.view_as(scores)
