"""What every sparse-training method shares: the sparse layers, their two masks, the hooks a
trainer calls, optimizer-state hygiene, checkpoint state and the sparsity report.

A trainer uses a method only through this interface, in this order each step:

    method.before_forward(step)         # e.g. ask for dense gradients at a RigL update
    loss.backward()                     # (AMP: after unscaling the gradients)
    method.after_backward(step)         # gradients are final: regulariser, gradient capture
    optimizer.step()
    changed = method.after_step(step + 1, optimizer)   # masks may change here

`step` is the number of optimizer steps done before the hook is called.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UserError, check_number
from .distribution import DISTRIBUTIONS, backward_counts, layer_counts
from .masking import MaskedWeight, attach, dense_parameter, named_masked_weights
from .selection import select_sparse_layers


@dataclass(eq=False)
class SparseLayer:
    """One sparse weight: θ lives in `module`, α = θ ⊙ forward is what it computes with."""

    name: str  # plain parameter name, e.g. "layer1.0.conv1.weight"
    module: nn.Module
    masked: MaskedWeight
    k_forward: int
    k_backward: int
    forward: torch.Tensor  # bool, the set A
    backward: torch.Tensor  # bool, the set B ⊇ A
    churn: float = 0.0  # share of A that changed at the last mask update

    @property
    def theta(self) -> nn.Parameter:
        return dense_parameter(self.module)

    @property
    def numel(self) -> int:
        return self.forward.numel()

    @property
    def density(self) -> float:
        return self.k_forward / self.numel


def zero_optimizer_state(optimizer: torch.optim.Optimizer | None, param: torch.Tensor, where: torch.Tensor) -> None:
    """Zero every per-entry optimizer state (momentum, Adam moments, ...) at `where`, so
    that a zero gradient leaves those entries exactly unchanged at the next steps."""
    if optimizer is None or not bool(where.any()):
        return
    for value in optimizer.state.get(param, {}).values():
        if torch.is_tensor(value) and value.shape == param.shape:
            value.masked_fill_(where, 0)


def _check_fraction(key: str, value, upper_open: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{key}={value!r} must be a number in [0, 1)")
    if not (0.0 <= value < 1.0 if upper_open else 0.0 <= value <= 1.0):
        raise UserError(f"{key}={value} is out of range; allowed: 0 <= {key} < 1")
    return float(value)


def check_steps(key: str, value):
    """A schedule point: null, a step count >= 0, or a fraction 0 < x < 1 of the run."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    if isinstance(value, float) and 0.0 < value < 1.0:
        return value
    raise UserError(f"{key}={value!r} must be null, a step count >= 0, or a fraction of the run in (0, 1)")


def resolve_steps(value, total_steps: int | None) -> int | None:
    """Steps for a value of `check_steps`; a fraction needs the run's length (else None)."""
    if isinstance(value, float):
        return round(value * total_steps) if total_steps is not None else None
    return value


class SparsityMethod:
    """Base class. Subclasses set `name` and override `initial_masks` and the hooks."""

    name = "sparse"

    def __init__(
        self,
        forward: float = 0.9,
        backward: float | None = None,
        distribution: str = "uniform",
        dense_first: bool = True,
        dense_layers: list[str] | tuple = (),
        include_embeddings: bool = False,
        regularization: float = 0.0,
    ):
        self.forward_sparsity = _check_fraction("sparsity.forward", forward)
        if backward is None:
            # The paper's 90/80 pair as a rule: backward density = 2 x forward density.
            backward = max(0.0, 1.0 - 2.0 * (1.0 - self.forward_sparsity))
        self.backward_sparsity = _check_fraction("sparsity.backward", backward)
        if self.backward_sparsity > self.forward_sparsity + 1e-12:
            raise UserError(
                f"sparsity.backward={backward} is above sparsity.forward={forward}; "
                "the backward set must contain the forward set (backward <= forward)"
            )
        if distribution not in DISTRIBUTIONS:
            raise UserError(f"sparsity.distribution={distribution!r} is not known; allowed: {', '.join(DISTRIBUTIONS)}")
        self.distribution = distribution
        self.dense_first = bool(dense_first)
        self.dense_layers = list(dense_layers or ())
        self.include_embeddings = bool(include_embeddings)
        self.regularization_scale = check_number("sparsity.regularization", regularization)
        self.layers: list[SparseLayer] = []

    # ----------------------------------------------------------------- set-up
    @property
    def density(self) -> float:
        return 1.0 - self.forward_sparsity

    @property
    def backward_density(self) -> float:
        return 1.0 - self.backward_sparsity

    def attach(self, model: nn.Module, total_steps: int | None = None) -> "SparsityMethod":
        """Choose the sparse layers of `model`, size their sets and set the first masks.
        Call after moving the model to its device and before building the optimizer.
        `total_steps` (the run's length) turns schedule points given as fractions into steps.
        At forward sparsity 0 every method is dense training: nothing is attached."""
        self.total_steps = total_steps
        self.resolve_schedule(total_steps)
        if self.forward_sparsity == 0.0:
            return self
        for pname, name, module, k, k_backward in self.plan(model):
            theta = module.weight
            empty = torch.zeros(theta.shape, dtype=torch.bool, device=theta.device)
            self.layers.append(SparseLayer(pname, module, attach(module), k, k_backward, empty, empty))
        for layer in self.layers:
            forward, backward = self.initial_masks(layer)
            self.set_masks(layer, forward, backward)
            layer.churn = 0.0
        return self

    def plan(self, model: nn.Module) -> list[tuple[str, str, nn.Module, int, int]]:
        """(parameter name, module name, module, k_forward, k_backward) of each layer that
        `attach` makes sparse, or the UserError it would raise. Reads only shapes, so a
        model built on the meta device can be checked before any work is done."""
        chosen = select_sparse_layers(model, self.dense_first, self.dense_layers, self.include_embeddings)
        names = [f"{n}.weight" if n else "weight" for n, _ in chosen]
        shapes = {pname: tuple(m.weight.shape) for pname, (_, m) in zip(names, chosen)}
        k_forward = layer_counts(shapes, self.density, self.distribution)
        k_backward = backward_counts(shapes, k_forward, self.density, self.backward_density, self.distribution)
        plan = []
        for pname, (name, module) in zip(names, chosen):
            numel, k = module.weight.numel(), k_forward[pname]
            if k == 0:
                raise UserError(
                    f"sparsity.forward={self.forward_sparsity} leaves layer {name} ({numel} weights) with no "
                    "weight; lower the sparsity or keep the layer dense (sparsity.dense_layers)"
                )
            plan.append((pname, name, module, k, k_backward[pname]))
        return plan

    def resolve_schedule(self, total_steps: int | None) -> None:
        """Turn the method's schedule points into step counts (see `resolve_steps`)."""

    def initial_masks(self, layer: SparseLayer) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def sparse_parameters(self) -> list[nn.Parameter]:
        """θ of every sparse layer: the trainer gives these no ordinary weight decay."""
        return [layer.theta for layer in self.layers]

    # ------------------------------------------------------------------ hooks
    def before_forward(self, step: int) -> None:
        """Called before the forward pass of optimizer step `step`."""

    @torch.no_grad()
    def after_backward(self, step: int) -> None:
        """Called when the gradients of step `step` are final (unscaled), before clipping.
        Adds the regulariser's gradient λ·s⊙θ, s = a·1_A + b·1_B (`regularizer_weights`),
        in place from the masks the layer already holds: no per-layer tensor for s."""
        if self.regularization_scale == 0.0:
            return
        for layer in self.layers:
            theta, masked = layer.theta, layer.masked
            if theta.grad is None:
                continue
            a, b = self.regularizer_weights(layer)
            if a:
                theta.grad.addcmul_(theta, masked.forward_mask, value=self.regularization_scale * a)
            if b:
                theta.grad.addcmul_(theta, masked.backward_mask, value=self.regularization_scale * b)

    def after_step(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> bool:
        """Called after optimizer step number `step` (1-based). Returns True if masks changed."""
        return False

    @torch.no_grad()
    def regularization(self) -> float | None:
        """λ/2 · Σ s⊙θ², summed over layers (its gradient is the one applied); None if λ = 0."""
        if not self.layers or self.regularization_scale == 0.0:
            return None
        total = 0.0
        for layer in self.layers:
            a, b = self.regularizer_weights(layer)
            square = layer.theta.detach().square()
            total += a * float((square * layer.masked.forward_mask).sum()) + b * float((square * layer.masked.backward_mask).sum())
        return 0.5 * self.regularization_scale * total

    def regularizer_weights(self, layer: SparseLayer) -> tuple[float, float]:
        """(a, b) of the regulariser's per-entry weight s = a·1_A + b·1_B. Default (0, 1): L2
        on the trained entries (B), weight decay that leaves frozen entries alone."""
        return 0.0, 1.0

    def phase(self, step: int) -> str:
        """What the method is doing after `step` steps (logged with each sparsity record)."""
        return "static" if self.layers else "dense"

    # ---------------------------------------------------------------- helpers
    @torch.no_grad()
    def set_masks(
        self,
        layer: SparseLayer,
        forward: torch.Tensor,
        backward: torch.Tensor,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        """Install new masks; entries leaving B lose their optimizer state so they freeze."""
        if layer.forward.any():
            # |A_new Δ A_old| / (|A_old| + |A_new|): the share of A replaced when its size is
            # fixed, and also counts what pruning removes.
            sizes = int(layer.forward.sum()) + int(forward.sum())
            layer.churn = float((forward ^ layer.forward).sum()) / max(1, sizes)
        zero_optimizer_state(optimizer, layer.theta, layer.backward & ~backward)
        layer.forward, layer.backward = forward, backward
        layer.masked.set_masks(forward, backward)

    # -------------------------------------------------------------- reporting
    def report(self, step: int) -> dict:
        """The sparsity record (one line of sparsity.jsonl), measured from the masks."""
        layers, n, nf, nb = {}, 0, 0, 0
        for layer in self.layers:
            f, b = int(layer.forward.sum()), int(layer.backward.sum())
            layers[layer.name] = {
                "numel": layer.numel,
                "forward_density": f / layer.numel,
                "backward_density": b / layer.numel,
                "churn": layer.churn,
            }
            n, nf, nb = n + layer.numel, nf + f, nb + b
        return {
            "step": step,
            "phase": self.phase(step),
            "forward_density": nf / n if n else 1.0,
            "backward_density": nb / n if n else 1.0,
            "layers": layers,
        }

    # ------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        return {
            "method": self.name,
            "masks": {l.name: {"forward": l.forward.cpu(), "backward": l.backward.cpu()} for l in self.layers},
            "churn": {l.name: l.churn for l in self.layers},
            "extra": self.extra_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        masks = state["masks"]
        mine = {l.name for l in self.layers}
        if set(masks) != mine:
            missing, unexpected = sorted(mine - set(masks)), sorted(set(masks) - mine)
            raise UserError(
                f"checkpoint masks do not fit this model's sparse layers (missing: {missing[:3]}, "
                f"unexpected: {unexpected[:3]}); was it written with another model or sparsity config?"
            )
        for layer in self.layers:
            m = masks[layer.name]
            device = layer.theta.device
            forward, backward = m["forward"].to(device), m["backward"].to(device)
            if torch.equal(forward, backward):
                backward = forward  # one shared mask, as before the checkpoint
            self.set_masks(layer, forward, backward)
            layer.churn = state.get("churn", {}).get(layer.name, 0.0)
        self.load_extra_state(state.get("extra") or {})

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass


def measured_density(model: nn.Module) -> dict:
    """Nonzeros of the weights the model computes with (α for sparse layers), counted from
    the tensors, over all parameters and over the sparse layers alone."""
    total = nonzero = sparse_total = sparse_nonzero = 0
    masked = {id(dense_parameter(m)): p for _, m, p in named_masked_weights(model)}
    with torch.no_grad():
        for param in model.parameters():
            p = masked.get(id(param))
            value = param if p is None or p.use_dense else param * p.forward_mask
            nz = int(torch.count_nonzero(value))
            total, nonzero = total + param.numel(), nonzero + nz
            if p is not None:
                sparse_total, sparse_nonzero = sparse_total + param.numel(), sparse_nonzero + nz
    return {
        "params": total,
        "nonzero": nonzero,
        "density": nonzero / max(1, total),
        "sparse_params": sparse_total,
        "sparse_density": sparse_nonzero / sparse_total if sparse_total else 1.0,
    }
