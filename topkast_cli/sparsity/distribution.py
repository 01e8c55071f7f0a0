"""How a global density is spread over layers: `uniform` or `erk` (Erdős–Rényi-Kernel)."""

from __future__ import annotations

import math

from ..errors import UserError

DISTRIBUTIONS = ("uniform", "erk")


def layer_counts(shapes: dict[str, tuple], density: float, distribution: str,
                 units: dict[str, int] | None = None) -> dict[str, int]:
    """Number of nonzeros k per layer for a target density.

    uniform: every layer keeps round(density * numel).
    erk: layer density proportional to sum(shape) / prod(shape) (RigL's ERK, kernel
    dimensions included), scaled so that the total nonzeros equal round(density * total),
    no layer above density 1 (layers that would be are made dense and the rest rescaled).

    `units`: the layers' sizes in the units masks are chosen in (blocks of weights; default:
    single weights); the counts and totals are then in those units, the ERK densities still
    come from the weights' shapes.
    """
    numel = units if units is not None else {n: math.prod(s) for n, s in shapes.items()}
    if distribution == "uniform":
        return {n: round(density * numel[n]) for n in shapes}
    if distribution != "erk":
        raise UserError(f"sparsity.distribution={distribution!r} is not known; allowed: {', '.join(DISTRIBUTIONS)}")
    target = round(density * sum(numel.values()))
    raw = {n: sum(s) / math.prod(s) for n, s in shapes.items()}
    dense: set[str] = set()
    while True:
        budget = target - sum(numel[n] for n in dense)
        free = [n for n in shapes if n not in dense]
        scale = budget / sum(raw[n] * numel[n] for n in free) if free else 0.0
        over = [n for n in free if raw[n] * scale > 1.0]
        if not over:
            break
        dense.update(over)
    exact = {n: (numel[n] if n in dense else raw[n] * scale * numel[n]) for n in shapes}
    return _round_to_total(exact, numel, target)


def _round_to_total(exact: dict[str, float], cap: dict[str, int], total: int) -> dict[str, int]:
    """Largest-remainder rounding: integers that sum to `total`, each within [0, cap]."""
    counts = {n: min(cap[n], math.floor(v)) for n, v in exact.items()}
    short = total - sum(counts.values())
    by_remainder = sorted(exact, key=lambda n: exact[n] - math.floor(exact[n]), reverse=True)
    for n in by_remainder:
        if short <= 0:
            break
        if counts[n] < cap[n]:
            counts[n] += 1
            short -= 1
    return counts


def backward_counts(shapes: dict[str, tuple], k_forward: dict[str, int], density: float,
                    backward_density: float, distribution: str, units: dict[str, int] | None = None) -> dict[str, int]:
    """Backward-set size per layer. uniform: round(backward_density * numel). erk: the global
    ratio (D+M)/D kept per layer, capped at the layer size. Never below k_forward. `units`:
    as in `layer_counts`."""
    counts = {}
    for name, shape in shapes.items():
        numel, k = units[name] if units is not None else math.prod(shape), k_forward[name]
        if distribution == "uniform":
            kb = round(backward_density * numel)
        else:
            kb = min(numel, round(k * backward_density / density))
        counts[name] = max(k, kb)
    return counts
