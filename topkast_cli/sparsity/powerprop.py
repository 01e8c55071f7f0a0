"""Powerpropagation (Schwarz, Jayakumar et al., NeurIPS 2021): a layer computes with
w = θ·|θ|^(p−1) of the parameter θ it trains. The gradient p·|θ|^(p−1)·∂L/∂w shrinks for
small θ, so large weights keep growing and small ones stay small: magnitudes separate, and
ranking them (Top-KAST's |θ|, the same order as |w|) is less noisy. p = 1 is plain training.

Both compute sides (`masking`, `sparse_linear`) apply `weight` to θ (or to B's values)
before the mask: A's entries compute with w and B \\ A's get the chain rule's gradient.
"""

from __future__ import annotations

import math

import torch

from ..errors import UserError

MAX_POWER = 10.0


class _Power(torch.autograd.Function):
    """w = θ·|θ|^(p−1) with gradient p·|θ|^(p−1)·g, written out: autograd's own chain through
    `abs().pow()` gives 0·inf = NaN at θ = 0 for p < 2."""

    @staticmethod
    def forward(ctx, theta, p):
        ctx.save_for_backward(theta)
        ctx.p = p
        return theta * theta.abs().pow(p - 1)

    @staticmethod
    def backward(ctx, grad):
        (theta,) = ctx.saved_tensors
        return grad * (ctx.p * theta.abs().pow(ctx.p - 1)), None


class _Square(torch.autograd.Function):
    """p = 2: w = θ·|θ|, gradient 2·|θ|·g."""

    @staticmethod
    def forward(ctx, theta):
        ctx.save_for_backward(theta)
        return theta * theta.abs()

    @staticmethod
    def backward(ctx, grad):
        (theta,) = ctx.saved_tensors
        return grad * (2 * theta.abs())


def weight(theta: torch.Tensor, p: float) -> torch.Tensor:
    """w = θ·|θ|^(p−1), differentiable in θ; θ itself for p = 1."""
    if p == 1:
        return theta
    if p == 2:  # the usual case, without pow
        return _Square.apply(theta)
    return _Power.apply(theta, p)


@torch.no_grad()
def parameter_for(w: torch.Tensor, p: float) -> torch.Tensor:
    """θ = sign(w)·|w|^(1/p), the θ whose `weight` is w (up to rounding): a layer's initial
    weights re-expressed so that switching Powerpropagation on leaves the initial function
    as it was."""
    if p == 1:
        return w.clone()
    return w.sign() * w.abs().pow(1.0 / p)


def check_power(value) -> float:
    """`sparsity.powerprop`: a number in [1, MAX_POWER] (1: off)."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or not 1.0 <= value <= MAX_POWER:
        raise UserError(f"sparsity.powerprop={value!r} must be a number in [1, {MAX_POWER:g}] (1: off)")
    return float(value)
