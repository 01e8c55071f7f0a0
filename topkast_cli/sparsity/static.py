"""Static sparsity: a random mask drawn at initialisation and never changed (the baseline
every dynamic method must beat)."""

from __future__ import annotations

import torch

from .base import SparseLayer, SparsityMethod
from .topk import topk_mask


def random_mask(shape, k: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """Exactly k entries chosen uniformly at random."""
    scores = torch.rand(shape, generator=generator)
    return topk_mask(scores, k).to(device)


class Static(SparsityMethod):
    """A = B = a uniformly random set of each layer's k weights, fixed for the whole run.
    `regularization` is L2 on the active weights (weight decay that leaves frozen ones alone)."""

    name = "static"

    def __init__(self, forward: float = 0.9, regularization: float = 0.0, **selection):
        super().__init__(forward, forward, regularization=regularization, **selection)

    def initial_masks(self, layer: SparseLayer):
        # The global RNG, seeded by the run: the masks are part of the checkpoint after that.
        mask = random_mask(layer.theta.shape, layer.k_forward, layer.theta.device)
        return mask, mask
