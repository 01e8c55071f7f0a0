"""Learning-rate schedules over optimizer steps: linear warm-up, then constant, cosine or
multi-step. Warm-up and milestones are fractions of the whole run, so a schedule means the
same thing for a step budget and an epoch budget."""

from __future__ import annotations

import math

from torch.optim.lr_scheduler import LambdaLR

from .errors import UserError

SHAPES = ("constant", "cosine", "multistep")


def lr_factor(step: int, total: int, shape: str, warmup: float, milestones, gamma: float, final_lr_ratio: float) -> float:
    warm = round(warmup * total)
    if step < warm:
        return (step + 1) / warm
    if shape == "constant":
        return 1.0
    progress = min(1.0, (step - warm) / max(1, total - warm))
    if shape == "cosine":
        return final_lr_ratio + (1.0 - final_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    passed = sum(step >= round(m * total) for m in milestones)
    return gamma**passed


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def warmup_schedule(
    optimizer,
    total_steps: int,
    shape: str = "constant",
    warmup: float = 0.0,
    milestones: list | tuple = (),
    gamma: float = 0.1,
    final_lr_ratio: float = 0.0,
) -> LambdaLR:
    if shape not in SHAPES:
        raise UserError(f"scheduler.shape={shape!r} is not known; allowed: {', '.join(SHAPES)}")
    if not _number(warmup) or not 0.0 <= warmup < 1.0:
        raise UserError(f"scheduler.warmup={warmup!r} must be a fraction of the run in [0, 1)")
    if not isinstance(milestones, (list, tuple)) or any(not _number(m) or not 0.0 < m < 1.0 for m in milestones):
        raise UserError(f"scheduler.milestones={milestones!r} must be a list of fractions of the run in (0, 1)")
    if not _number(gamma) or not gamma > 0:
        raise UserError(f"scheduler.gamma={gamma!r} must be a number > 0")
    if not _number(final_lr_ratio) or not 0.0 <= final_lr_ratio <= 1.0:
        raise UserError(f"scheduler.final_lr_ratio={final_lr_ratio!r} must be a number in [0, 1]")
    milestones = tuple(milestones)
    return LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, shape, warmup, milestones, gamma, final_lr_ratio)
    )
