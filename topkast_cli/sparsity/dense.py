"""The dense baseline: no masks, every weight trained, ordinary weight decay."""

from __future__ import annotations

from .base import SparsityMethod


class Dense(SparsityMethod):
    name = "dense"
    resume_may_change = ("regularization",)  # no sparse layer: no backend to choose

    def __init__(self):
        super().__init__(forward=0.0, backward=0.0)
