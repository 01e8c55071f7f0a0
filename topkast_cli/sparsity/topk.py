"""Exact top-k masks by magnitude."""

from __future__ import annotations

import torch


def topk_masks(scores: torch.Tensor, k_forward: int, k_backward: int):
    """Boolean masks of the k_forward and k_backward largest scores.

    One `torch.topk` for both sets, so ties are broken the same way in both: the forward
    set is a prefix of the backward set (A ⊆ B) and each holds exactly k entries, whatever
    the ties (a threshold or quantile would not; quantile also fails above 2^24 elements).
    """
    if not 0 <= k_forward <= k_backward <= scores.numel():
        raise ValueError(f"need 0 <= k_forward ({k_forward}) <= k_backward ({k_backward}) <= {scores.numel()}")
    flat = scores.reshape(-1)
    idx = torch.topk(flat, k_backward, sorted=True).indices
    forward = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
    backward = torch.zeros_like(forward)
    forward[idx[:k_forward]] = True
    backward[idx] = True
    return forward.view_as(scores), backward.view_as(scores)


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly the k largest scores."""
    return topk_masks(scores, k, k)[0]
