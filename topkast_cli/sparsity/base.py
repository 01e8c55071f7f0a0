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

import torch
from torch import nn

from ..errors import UserError, check_number
from .distribution import DISTRIBUTIONS, backward_counts, layer_counts
from .masking import MaskedWeight, attach, dense_parameter
from .schedule import MaskSchedule
from .selection import select_sparse_layers


class SparseLayer:
    """One sparse weight and the single owner of its masks. θ lives in `module`; α = θ ⊙ 1_A
    is what the layer computes with; gradients reach B ⊇ A.

    The masks are stored once, as bool tensors, in the compute side (the `MaskedWeight`
    parametrization of `module.weight`). `forward` / `backward` read them; `set_masks`
    changes them (the only way to); `pass_dense_gradient` and `use_dense_weights` switch how
    the compute side uses them. Nothing else touches the compute side.
    """

    def __init__(self, name: str, module: nn.Module, k_forward: int, k_backward: int):
        self.name = name  # plain parameter name, e.g. "layer1.0.conv1.weight"
        self.module = module
        self.k_forward = k_forward
        self.k_backward = k_backward
        self.churn = 0.0  # share of A that changed at the last mask update
        self._compute: MaskedWeight = attach(module)  # masks start empty (no entry in A or B)

    def __repr__(self) -> str:
        return f"SparseLayer({self.name!r}, numel={self.numel}, k_forward={self.k_forward}, k_backward={self.k_backward})"

    @property
    def theta(self) -> nn.Parameter:
        return dense_parameter(self.module)

    @property
    def forward(self) -> torch.Tensor:
        """The set A (bool, θ's shape): the tensor the layer computes with. Do not modify it
        in place: `set_masks` installs new masks."""
        return self._compute.forward_mask

    @property
    def backward(self) -> torch.Tensor:
        """The set B ⊇ A (bool); the same tensor as `forward` when B = A."""
        return self._compute.backward_mask

    @property
    def numel(self) -> int:
        return self.forward.numel()

    @property
    def density(self) -> float:
        return self.k_forward / self.numel

    @torch.no_grad()
    def set_masks(
        self,
        forward: torch.Tensor,
        backward: torch.Tensor,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        """Install new masks A (`forward`) and B (`backward`), bool tensors of θ's shape.
        Records the churn of A; entries leaving B lose their optimizer state so they freeze;
        B equal to A is stored as one tensor."""
        shape = self.theta.shape
        for mask in (forward, backward):
            if mask.dtype != torch.bool or mask.shape != shape:
                raise ValueError(f"{self.name}: masks must be bool tensors of shape {tuple(shape)}, "
                                 f"got {mask.dtype} {tuple(mask.shape)}")
        old_forward, old_backward = self.forward, self.backward
        if old_forward.any():
            # |A_new Δ A_old| / (|A_old| + |A_new|): the share of A replaced when its size is
            # fixed, and also counts what pruning removes.
            sizes = int(old_forward.sum()) + int(forward.sum())
            self.churn = float((forward ^ old_forward).sum()) / max(1, sizes)
        zero_optimizer_state(optimizer, self.theta, old_backward & ~backward)
        if backward is not forward and torch.equal(backward, forward):
            backward = forward  # B = A: one shared mask
        self._compute.forward_mask, self._compute.backward_mask = forward, backward

    def pass_dense_gradient(self, dense: bool) -> None:
        """While on, the backward pass lets every entry's gradient (∂L/∂α) through instead of
        only B's; the masks themselves do not change (RigL's dense-gradient capture)."""
        self._compute.dense_gradient = bool(dense)

    def use_dense_weights(self, dense: bool) -> None:
        """Compute with the dense θ instead of α (evaluation of the dense network)."""
        self._compute.use_dense = bool(dense)

    @torch.no_grad()
    def nonzero(self) -> int:
        """Nonzero entries of the weight the layer computes with (α, or θ when dense)."""
        theta = self.theta.detach()
        if self._compute.use_dense:
            return int(torch.count_nonzero(theta))
        return int(((theta != 0) & self.forward).sum())


def zero_optimizer_state(optimizer: torch.optim.Optimizer | None, param: torch.Tensor, where: torch.Tensor) -> None:
    """Zero every per-entry optimizer state (momentum, Adam moments, ...) at `where`, so
    that a zero gradient leaves those entries exactly unchanged at the next steps."""
    if optimizer is None or not bool(where.any()):
        return
    for value in optimizer.state.get(param, {}).values():
        if torch.is_tensor(value) and value.shape == param.shape:
            value.masked_fill_(where, 0)


def default_backward_sparsity(forward_sparsity: float) -> float:
    """Backward sparsity when none is given: backward density = 2 x forward density, capped
    at 1 (the paper's 90/80 pair as a rule)."""
    return max(0.0, 1.0 - 2.0 * (1.0 - forward_sparsity))


def _check_fraction(key: str, value, upper_open: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{key}={value!r} must be a number in [0, 1)")
    if not (0.0 <= value < 1.0 if upper_open else 0.0 <= value <= 1.0):
        raise UserError(f"{key}={value} is out of range; allowed: 0 <= {key} < 1")
    return float(value)


class SparsityMethod:
    """Base class. Subclasses set `name` and override `initial_masks` and the hooks.

    A method describes itself, so a trainer, eval or sweep never reads its config keys or
    class name: `display_name`, `backward_is_forward`, `backward_rule`, `resume_may_change`,
    `phase(step)`. Instances are cheap to build without a model (Hydra builds them from
    conf/sparsity/*.yaml); `attach` makes a model sparse.
    """

    name = "sparse"
    # B = A always (no backward set beyond the forward one). Top-KAST: False.
    backward_is_forward = True
    # Config keys (under `sparsity.`) that may differ when a run is resumed: the rest must match.
    resume_may_change: tuple[str, ...] = ("regularization",)
    # When masks change (None: never). Subclasses that change masks set one in __init__.
    schedule: MaskSchedule | None = None

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
        self.backward_given = backward  # as configured (None: the rule)
        if backward is None:
            backward = default_backward_sparsity(self.forward_sparsity)
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

    # ---------------------------------------------------------- self-description
    @property
    def display_name(self) -> str:
        """"dense" when the method makes no layer sparse (forward sparsity 0), else `name`."""
        return "dense" if self.forward_sparsity == 0.0 else self.name

    @property
    def backward_rule(self) -> str:
        """How the backward set is chosen, for tables: "-" when B = A (or dense), "2x density"
        for the default rule (`default_backward_sparsity`), else the backward sparsity as
        configured."""
        if self.backward_is_forward or self.display_name == "dense":
            return "-"
        return "2x density" if self.backward_given is None else str(self.backward_given)

    def phase(self, step: int) -> str:
        """What the method is doing after `step` steps (logged with each sparsity record)."""
        return "static" if self.layers else "dense"

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
            self.layers.append(SparseLayer(pname, module, k, k_backward))
        for layer in self.layers:
            forward, backward = self.initial_masks(layer)
            layer.set_masks(forward, backward)
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
        """Turn the schedule's points given as fractions into steps of a run of `total_steps`."""
        if self.schedule is not None:
            self.schedule.resolve(total_steps)

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
        in place from the layer's bool masks: no per-layer tensor for s."""
        if self.regularization_scale == 0.0:
            return
        for layer in self.layers:
            theta = layer.theta
            if theta.grad is None:
                continue
            a, b = self.regularizer_weights(layer)
            if a:
                theta.grad.addcmul_(theta, layer.forward, value=self.regularization_scale * a)
            if b:
                theta.grad.addcmul_(theta, layer.backward, value=self.regularization_scale * b)

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
            total += a * float((square * layer.forward).sum()) + b * float((square * layer.backward).sum())
        return 0.5 * self.regularization_scale * total

    def regularizer_weights(self, layer: SparseLayer) -> tuple[float, float]:
        """(a, b) of the regulariser's per-entry weight s = a·1_A + b·1_B. Default (0, 1): L2
        on the trained entries (B), weight decay that leaves frozen entries alone."""
        return 0.0, 1.0

    # ------------------------------------------------------------ measurement
    def measured_density(self, model: nn.Module) -> dict:
        """Nonzeros of the weights `model` computes with (α for this method's sparse layers),
        counted from the tensors, over all parameters and over the sparse layers alone."""
        total = nonzero = sparse_total = sparse_nonzero = 0
        sparse = {id(layer.theta): layer for layer in self.layers}
        with torch.no_grad():
            for param in model.parameters():
                layer = sparse.get(id(param))
                nz = int(torch.count_nonzero(param)) if layer is None else layer.nonzero()
                total, nonzero = total + param.numel(), nonzero + nz
                if layer is not None:
                    sparse_total, sparse_nonzero = sparse_total + param.numel(), sparse_nonzero + nz
        return {
            "params": total,
            "nonzero": nonzero,
            "density": nonzero / max(1, total),
            "sparse_params": sparse_total,
            "sparse_density": sparse_nonzero / sparse_total if sparse_total else 1.0,
        }

    def use_dense_weights(self, dense: bool = True) -> None:
        """Make every sparse layer compute with θ instead of α (for `eval.dense=true`)."""
        for layer in self.layers:
            layer.use_dense_weights(dense)

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
            try:
                layer.set_masks(forward, backward)  # B = A: one shared mask again
            except ValueError as e:
                raise UserError(f"checkpoint masks do not fit this model: {e}") from None
            layer.churn = state.get("churn", {}).get(layer.name, 0.0)
        self.load_extra_state(state.get("extra") or {})

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass
