"""Top-KAST (Elsen et al., NeurIPS 2020): always-sparse training with a forward set A of the
top-D |θ| and a larger backward set B ⊇ A that lets candidates earn their way into A."""

from __future__ import annotations

import math

import torch

from ..errors import UserError
from .base import SparseLayer, SparsityMethod
from .powerprop import check_power
from .schedule import MaskSchedule
from .structure import in_stored_layout, structure_from_config


class TopKAST(SparsityMethod):
    """Per layer: A = top k_A by |θ|, B = top k_B by |θ| (one topk, so A ⊆ B); or the same
    rule on r x c blocks by their norm (`block`), or within groups of m inputs (`pattern=nm`):
    see `structure`.

    - the layer computes with θ ⊙ 1_A; gradients reach exactly B (∂L/∂α on B),
    - exploration regulariser instead of weight decay on θ: gradient λθ on A and λθ/D on
      B \\ A (D = the layer's forward density), nothing outside B,
    - A and B are recomputed from |θ| every `refresh_interval` steps while exploring,
    - after `exploration_steps` steps (a count, or a fraction of the run; null: never) the
      masks lock: A is fixed, B = A (refinement). The lock is part of the method's state
      (a resumed run stays locked even if exploration_steps changed).

    Options for sparse layers that learn slowly (all off by default): `powerprop` p, the layer
    computes with θ·|θ|^(p−1) (`powerprop`); `alpha_scale`, a factor on the initial weights
    ("rms": `base.initial_scale`); `lr_scale`, a factor on the sparse layers' learning rate
    ("density": `base.layer_lr_scale`). They must match on resume: θ means another thing
    under another p, and a checkpoint's optimizer holds its learning rates.
    """

    name = "topkast"
    backward_is_forward = False
    # The refresh period and the exploration length only decide when masks are next
    # recomputed from |θ|, and the lock is kept in the checkpoint: both may change on resume.
    resume_may_change = ("refresh_interval", "exploration_steps", "keep_units", *SparsityMethod.resume_may_change)
    # A checkpoint from before structured masks was unstructured.
    added_keys = {"block": [1, 1], "pattern": "block", "nm": None, "powerprop": 1, "alpha_scale": None, "lr_scale": None}

    def __init__(
        self,
        forward: float = 0.9,
        backward: float | None = None,
        refresh_interval: int = 25,
        exploration_steps: int | float | None = None,
        regularization: float = 0.0,
        keep_units: bool = False,
        block=(1, 1),
        pattern: str = "block",
        nm=None,
        powerprop: float = 1.0,
        alpha_scale: str | float | None = None,
        lr_scale: str | float | None = None,
        **selection,
    ):
        structure, forward, effective_backward = structure_from_config(
            pattern, block, nm, forward, backward, selection.get("distribution", "uniform"))
        super().__init__(forward, effective_backward, regularization=regularization, **selection)
        self.backward_given = backward
        self.structure = structure
        reason = structure.sparse_reason()
        if self.backend == "sparse" and reason:
            raise UserError(f"sparsity.backend=sparse cannot run {reason}; use sparsity.backend=masked "
                            "(auto keeps such layers masked)")
        if not isinstance(keep_units, bool):
            raise UserError(f"sparsity.keep_units={keep_units!r} must be true or false")
        # every output unit keeps its largest weight in A (and so in B): no unit is cut off
        self.keep_units = keep_units
        self.powerprop = check_power(powerprop)
        self.alpha_scale = _check_scale("sparsity.alpha_scale", alpha_scale, "rms")
        self.lr_scale = _check_scale("sparsity.lr_scale", lr_scale, "density")
        # Refresh every `refresh_interval` steps; at the end of exploration lock (with one
        # last refresh, B = A).
        self.schedule = MaskSchedule(
            refresh_interval, end=exploration_steps, update_at_end=True,
            names=("sparsity.refresh_interval", "sparsity.begin_steps", "sparsity.exploration_steps"),
        )
        self.resolve_schedule(None)

    def resolve_schedule(self, total_steps):
        super().resolve_schedule(total_steps)
        self.locked = self.schedule.ended(0)

    def phase(self, step: int) -> str:
        if not self.layers:
            return "dense"
        return "refine" if self.locked else "explore"

    def initial_masks(self, layer: SparseLayer):
        return self._top(layer)

    def _top(self, layer: SparseLayer):
        # Locked: B = A, one mask.
        k_backward = layer.k_forward if self.locked else layer.k_backward

        def choose(matrix):
            return self.structure.masks(matrix, layer.k_forward, k_backward, every_row=self.keep_units)

        # Single weights by |θ| have no layout; blocks, N:M groups and kept units are chosen
        # on the out x in matrix, which a weight stored (in, out) is not.
        by_matrix = layer.transposed and (not self.structure.unstructured or self.keep_units)
        return in_stored_layout(choose, layer.theta.detach(), by_matrix)

    def regularizer_weights(self, layer):
        # s = 1 on A, 1/D on B \ A: candidates pay more to stay, so only those whose gradient
        # keeps pushing them grow into A. As a·1_A + b·1_B: a = 1 - 1/D, b = 1/D.
        return 1.0 - 1.0 / layer.density, 1.0 / layer.density

    @torch.no_grad()
    def after_step(self, step: int, optimizer=None) -> bool:
        if self.locked:
            return False
        if self.schedule.ended(step):
            self.locked = True  # refinement: A is fixed from now on and B = A
        elif not self.schedule.updates_at(step):
            return False
        for layer in self.layers:
            forward, backward = self._top(layer)
            layer.set_masks(forward, backward, optimizer)
        return True

    def extra_state(self) -> dict:
        return {"locked": self.locked}

    def load_extra_state(self, state: dict) -> None:
        self.locked = bool(state.get("locked", self.locked))


def _check_scale(key: str, value, word: str) -> str | float | None:
    """null, `word`, or a number > 0."""
    if value is None or value == word:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise UserError(f"{key}={value!r} must be null, {word} or a number > 0")
    return float(value)
