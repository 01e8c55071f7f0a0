"""Exact top-k masks by magnitude."""

from __future__ import annotations

import math

import torch


def topk_masks(scores: torch.Tensor, k_forward: int, k_backward: int):
    """Boolean masks of the k_forward and k_backward largest scores.

    A is taken from within B (a top-k over B's scores), so ties are broken consistently:
    A ⊆ B, and each holds exactly k entries whatever the ties (a threshold or quantile would
    not; quantile also fails above 2^24 elements). Unsorted top-k keeps this cheap on
    large layers.
    """
    if not 0 <= k_forward <= k_backward <= scores.numel():
        raise ValueError(f"need 0 <= k_forward ({k_forward}) <= k_backward ({k_backward}) <= {scores.numel()}")
    flat = scores.reshape(-1)
    backward_idx = torch.topk(flat, k_backward, sorted=False).indices
    forward_idx = backward_idx[torch.topk(flat[backward_idx], k_forward, sorted=False).indices]
    forward = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
    backward = torch.zeros_like(forward)
    forward[forward_idx] = True
    backward[backward_idx] = True
    return forward.view_as(scores), backward.view_as(scores)


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly the k largest scores."""
    return topk_masks(scores, k, k)[0]


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
