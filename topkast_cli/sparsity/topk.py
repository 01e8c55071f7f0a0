"""Exact top-k masks by magnitude."""

from __future__ import annotations

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
