"""`sparsity.backend=auto`: per layer, the faster compute side, timed once on the run's own
input shapes before training starts.

Each layer is timed on the input it gets from one pass of an example batch (model in eval mode,
no gradient, so neither running statistics nor the random-number stream change): forward and
backward, a few times with the masked and with the sparse compute side, the best of each.
The optimizer update is not timed; it only favours `sparse` (its update touches |B| entries,
not all), so a close call goes to `masked`.
"""

from __future__ import annotations

import time

import torch
from torch import nn

REPEATS = 3
MARGIN = 0.95  # sparse must be at least 5% faster to be chosen


def _inputs(model: nn.Module, modules: list[nn.Module], example: torch.Tensor) -> dict[int, torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}

    def keep(module, args):
        seen.setdefault(id(module), args[0].detach())

    hooks = [m.register_forward_pre_hook(keep) for m in modules]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return seen


def _seconds(layer, x: torch.Tensor, grad: torch.Tensor) -> float:
    """Best time of the layer's forward and backward."""
    best = float("inf")
    x = x.detach().requires_grad_(True)
    for i in range(REPEATS + 1):  # the first is a warm-up
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        layer.module(x).backward(grad)
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            best = min(best, time.perf_counter() - t0)
    for p in [layer.trained, *layer.module.parameters()]:
        p.grad = None
    return best


def choose_backends(model: nn.Module, layers: list, example: torch.Tensor | None) -> dict[str, str]:
    """Put each of `layers` (on `masked`, able to run `sparse`) on the faster backend; returns
    {module name: what was chosen and why}. Without an example (or for a layer the example does
    not reach) the layer stays masked."""
    notes = {}
    names = {id(m): n for n, m in model.named_modules()}
    inputs = _inputs(model, [l.module for l in layers], example) if example is not None else {}
    generator = torch.Generator().manual_seed(0)
    for layer in layers:
        name = names.get(id(layer.module), layer.name)
        x = inputs.get(id(layer.module))
        if x is None:
            notes[name] = "masked (not timed: no example input reached it)"
            continue
        x = torch.randn(x.shape, generator=generator).to(x)
        with torch.no_grad():
            out_shape = layer.module(x).shape
        grad = torch.randn(out_shape, generator=generator).to(x)
        masked = _seconds(layer, x, grad)
        layer.use_backend("sparse")
        sparse = _seconds(layer, x, grad)
        if sparse > MARGIN * masked:
            layer.use_backend("masked")
        notes[name] = f"{layer.backend} (forward+backward {sparse * 1e3:.2f} ms sparse, {masked * 1e3:.2f} ms masked)"
    return notes
