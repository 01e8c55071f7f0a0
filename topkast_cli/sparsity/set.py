"""SET, Sparse Evolutionary Training (Mocanu et al., 2018): drop the smallest-magnitude
active weights, regrow as many at random."""

from __future__ import annotations

import torch

from .dynamic import DynamicSparse


class SET(DynamicSparse):
    """Every `update_interval` steps (until `end_steps`, null: the whole run) replace a
    `drop_fraction` of each layer's active weights: drop by magnitude, grow at random."""

    name = "set"

    def grow_scores(self, layer):
        return torch.rand(layer.theta.shape, generator=self.generator)
