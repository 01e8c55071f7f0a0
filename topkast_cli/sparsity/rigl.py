"""RigL, Rigging the Lottery (Evci et al., ICML 2020): drop the smallest-magnitude active
weights, regrow those inactive weights with the largest dense-gradient magnitude."""

from __future__ import annotations

import torch

from .dynamic import DynamicSparse


class RigL(DynamicSparse):
    """Every `update_interval` steps until `end_steps` replace a fraction of each layer's
    active weights, the fraction decaying from `drop_fraction` to 0 along a cosine.

    The dense gradient is only computed at update steps: `before_forward` asks every layer to
    pass the dense gradient (its masks stay as they are), `after_backward` records |∂L/∂α|
    and masks the gradient back to A, so the optimizer step itself is that of ordinary
    sparse training.
    """

    name = "rigl"
    needs_dense_gradient = True

    def __init__(self, forward=0.9, update_interval=100, drop_fraction=0.3, decay="cosine", end_steps=0.75, **kwargs):
        super().__init__(forward, update_interval, drop_fraction, decay, end_steps, **kwargs)
        self.scores: dict[str, torch.Tensor] = {}
        self.capturing = False  # the layers pass the dense gradient for this step

    def before_forward(self, step: int) -> None:
        self.capturing = self.update_due(step + 1)
        if self.capturing:
            for layer in self.layers:
                layer.pass_dense_gradient(True)

    def _close(self) -> None:
        """Back to gradients on B = A in every layer."""
        for layer in self.layers:
            layer.pass_dense_gradient(False)
        self.capturing = False

    @torch.no_grad()
    def after_backward(self, step: int) -> None:
        if self.capturing:
            for layer in self.layers:
                grad = layer.theta.grad
                if grad is not None:
                    self.scores[layer.name] = grad.abs()
                    grad.mul_(layer.backward)
            self._close()
        super().after_backward(step)

    def after_step(self, step: int, optimizer=None) -> bool:
        if self.capturing:  # the step was skipped before its gradients were final
            self._close()
        changed = super().after_step(step, optimizer)
        self.scores = {}  # the dense gradients are only kept for the update they serve
        return changed

    def grow_scores(self, layer):
        return self.scores.get(layer.name)
