"""Gradual magnitude pruning (Zhu & Gupta, 2017): train dense, then prune by magnitude
along a cubic schedule to the target sparsity, the dense-to-sparse reference."""

from __future__ import annotations

import math

import torch

from ..errors import UserError, check_int
from .base import SparseLayer, SparsityMethod, check_steps, resolve_steps
from .topk import topk_mask


class GMP(SparsityMethod):
    """Each layer's count of active weights goes from all of them at `begin_steps` to its
    target k at `end_steps`: k_t = k + (n - k)(1 - (t - t0)/(t1 - t0))³, recomputed every
    `prune_interval` steps and at `end_steps`. Pruning only removes: the k_t largest |θ| of
    the weights still active stay. Before `begin_steps` the layer is dense; after
    `end_steps` it holds exactly k. Steps may be counts or fractions of the run."""

    name = "gmp"

    def __init__(
        self,
        forward: float = 0.9,
        begin_steps: int | float = 0.1,
        end_steps: int | float = 0.75,
        prune_interval: int = 100,
        regularization: float = 0.0,
        **selection,
    ):
        super().__init__(forward, forward, regularization=regularization, **selection)
        self.prune_interval = check_int("sparsity.prune_interval", prune_interval)
        self.begin = check_steps("sparsity.begin_steps", begin_steps)
        self.end = check_steps("sparsity.end_steps", end_steps)
        if self.begin is None or self.end is None:
            raise UserError("sparsity.begin_steps and sparsity.end_steps must be set for gmp")
        if type(self.begin) is type(self.end) and self.begin > self.end:
            raise UserError(f"sparsity.begin_steps={begin_steps} is after sparsity.end_steps={end_steps}")
        self.resolve_schedule(None)

    def resolve_schedule(self, total_steps):
        self.begin_steps = resolve_steps(self.begin, total_steps)
        self.end_steps = resolve_steps(self.end, total_steps)
        if self.begin_steps is not None and self.end_steps is not None and self.begin_steps > self.end_steps:
            raise UserError(f"sparsity.begin_steps ({self.begin_steps} steps) is after sparsity.end_steps ({self.end_steps})")

    def count(self, layer: SparseLayer, step: int) -> int:
        """Active weights of `layer` after step `step` on the cubic schedule."""
        if self.begin_steps is None or self.end_steps is None:
            raise UserError("gmp: begin_steps/end_steps given as fractions need the run's length: attach(model, total_steps=N)")
        if step >= self.end_steps:
            return layer.k_forward
        if step <= self.begin_steps:
            return layer.numel
        left = 1.0 - (step - self.begin_steps) / (self.end_steps - self.begin_steps)
        return layer.k_forward + round((layer.numel - layer.k_forward) * left**3)

    def initial_masks(self, layer: SparseLayer):
        mask = self.prune(layer, torch.ones_like(layer.theta, dtype=torch.bool), self.count(layer, 0))
        return mask, mask

    def prune(self, layer: SparseLayer, active: torch.Tensor, k: int) -> torch.Tensor:
        if k >= int(active.sum()):
            return active
        return topk_mask(layer.theta.detach().abs().masked_fill(~active, -math.inf), k)

    def phase(self, step: int) -> str:
        if not self.layers:
            return "dense"
        return "fixed" if step >= self.end_steps else "prune"

    @torch.no_grad()
    def after_step(self, step: int, optimizer=None) -> bool:
        if not self.layers or step <= self.begin_steps or step > self.end_steps:
            return False
        if (step - self.begin_steps) % self.prune_interval != 0 and step != self.end_steps:
            return False
        changed = False
        for layer in self.layers:
            mask = self.prune(layer, layer.forward, self.count(layer, step))
            if not torch.equal(mask, layer.forward):
                self.set_masks(layer, mask, mask, optimizer)
                changed = True
        return changed
