"""Gradual magnitude pruning (Zhu & Gupta, 2017): train dense, then prune by magnitude
along a cubic schedule to the target sparsity, the dense-to-sparse reference."""

from __future__ import annotations

import math

import torch

from ..errors import UserError
from .base import OPTIMIZER_KEYS, SparseLayer, SparsityMethod
from .schedule import MaskSchedule
from .topk import topk_mask


class GMP(SparsityMethod):
    """Each layer's count of active weights goes from all of them at `begin_steps` to its
    target k at `end_steps`: k_t = k + (n - k)(1 - (t - t0)/(t1 - t0))³, recomputed every
    `prune_interval` steps and at `end_steps`. Pruning only removes: the k_t largest |θ| of
    the weights still active stay. Before `begin_steps` the layer is dense; after
    `end_steps` it holds exactly k. Steps may be counts or fractions of the run."""

    name = "gmp"
    # begin_steps / end_steps are not here: they set the target count at every step, and
    # pruning never regrows, so a window changed halfway through gives a mask path that is
    # neither run's (a later end cannot give back weights already pruned). The interval only
    # decides at which steps that same path is sampled.
    resume_may_change = ("prune_interval", "backend", *OPTIMIZER_KEYS)

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
        if begin_steps is None or end_steps is None:
            raise UserError("sparsity.begin_steps and sparsity.end_steps must be set for gmp")
        # Prune every `prune_interval` steps counted from `begin_steps`, and at `end_steps`.
        self.schedule = MaskSchedule(
            prune_interval, begin_steps, end_steps, update_at_end=True,
            names=("sparsity.prune_interval", "sparsity.begin_steps", "sparsity.end_steps"),
        )

    def count(self, layer: SparseLayer, step: int) -> int:
        """Active weights of `layer` after step `step` on the cubic schedule."""
        if not self.schedule.resolved:
            raise UserError("gmp: begin_steps/end_steps given as fractions need the run's length: attach(model, total_steps=N)")
        left = 1.0 - self.schedule.progress(step)  # 1 up to begin_steps, 0 from end_steps on
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
        return "fixed" if self.schedule.ended(step) else "prune"

    @torch.no_grad()
    def after_step(self, step: int, optimizer=None) -> bool:
        if not self.layers or not self.schedule.updates_at(step):
            return False
        changed = False
        for layer in self.layers:
            mask = self.prune(layer, layer.forward, self.count(layer, step))
            if not torch.equal(mask, layer.forward):
                layer.set_masks(mask, mask, optimizer)
                changed = True
        return changed
