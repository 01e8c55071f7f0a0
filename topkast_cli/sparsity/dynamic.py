"""What SET and RigL share: start from a random sparse mask, and every `update_interval`
steps drop the smallest-magnitude active weights of each layer and grow as many others,
so each layer keeps exactly its k weights. They differ only in how they choose what to grow."""

from __future__ import annotations

import math

import torch

from ..errors import UserError, check_number
from .base import OPTIMIZER_KEYS, SparseLayer, SparsityMethod
from .masking import zero_optimizer_state
from .schedule import MaskSchedule
from .static import random_mask
from .topk import topk_mask

DECAYS = ("constant", "cosine")


class DynamicSparse(SparsityMethod):
    """Prune-and-regrow at a fixed density. Subclasses define `grow_scores`."""

    # The schedule and the share replaced only shape the updates still to come (the masks
    # themselves are in the checkpoint): they may change on resume.
    resume_may_change = ("update_interval", "end_steps", "drop_fraction", "decay", "backend", *OPTIMIZER_KEYS)

    def __init__(
        self,
        forward: float = 0.9,
        update_interval: int = 100,
        drop_fraction: float = 0.3,
        decay: str = "constant",
        end_steps: int | float | None = None,
        regularization: float = 0.0,
        **selection,
    ):
        super().__init__(forward, forward, regularization=regularization, **selection)
        if decay not in DECAYS:
            raise UserError(f"sparsity.decay={decay!r} is not known; allowed: {', '.join(DECAYS)}")
        # Every `update_interval` steps up to `end_steps`; at `end_steps` itself only if it
        # falls on the period.
        self.schedule = MaskSchedule(
            update_interval, end=end_steps,
            names=("sparsity.update_interval", "sparsity.begin_steps", "sparsity.end_steps"),
        )
        self.drop_fraction = check_number("sparsity.drop_fraction", drop_fraction, 0.0, 1.0)
        self.decay = decay
        self.generator = torch.Generator()

    def attach(self, model, total_steps=None, example=None):
        # A private RNG for the random choices during training, seeded from the run's RNG
        # and saved in checkpoints, so a resumed run draws the same numbers.
        self.generator.manual_seed(int(torch.randint(2**62, ())))
        return super().attach(model, total_steps, example)

    def phase(self, step: int) -> str:
        if not self.layers:
            return "dense"
        return "fixed" if self.schedule.ended(step) else "dynamic"

    def initial_masks(self, layer: SparseLayer):
        mask = random_mask(layer.theta.shape, layer.k_forward, layer.theta.device, self.generator)
        return mask, mask

    def update_due(self, step: int) -> bool:
        """Masks change after optimizer step `step` (1-based)."""
        return bool(self.layers) and self.schedule.updates_at(step)

    def fraction(self, step: int) -> float:
        """Share of each layer's active weights replaced at `step`: constant, or cosine decay
        to 0 at `end_steps` (RigL)."""
        if self.decay == "constant" or not self.schedule.end:
            return self.drop_fraction
        return self.drop_fraction / 2 * (1 + math.cos(math.pi * self.schedule.progress(step)))

    def grow_scores(self, layer: SparseLayer) -> torch.Tensor | None:
        """Higher grows first; None skips this update (e.g. no gradient was captured)."""
        raise NotImplementedError

    @torch.no_grad()
    def after_step(self, step: int, optimizer=None) -> bool:
        if not self.update_due(step):
            return False
        fraction = self.fraction(step)
        changed = False
        for layer in self.layers:
            scores = self.grow_scores(layer)
            if scores is not None:
                self.drop_and_grow(layer, round(fraction * layer.k_forward), scores, optimizer)
                changed = True
        return changed

    @torch.no_grad()
    def drop_and_grow(self, layer: SparseLayer, n: int, scores: torch.Tensor, optimizer=None) -> None:
        """Drop the n smallest |θ| of A, grow the n best-scoring entries outside what is kept.
        Newly grown weights start at zero with fresh optimizer state."""
        theta, old = layer.theta, layer.forward
        magnitude = theta.detach().abs().masked_fill(~old, -math.inf)
        keep = topk_mask(magnitude, layer.k_forward - n)
        grow = topk_mask(scores.to(theta.device).masked_fill(keep, -math.inf), n)
        new = keep | grow
        born = new & ~old
        theta.masked_fill_(born, 0)
        zero_optimizer_state(optimizer, theta, born)
        layer.set_masks(new, new, optimizer)

    def extra_state(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_extra_state(self, state: dict) -> None:
        if "generator" in state:
            self.generator.set_state(state["generator"])
