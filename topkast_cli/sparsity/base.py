"""What every sparse-training method shares: the sparse layers, their two masks, the hooks a
trainer calls, optimizer-state hygiene, checkpoint state and the sparsity report.

A trainer uses a method only through this interface, in this order each step:

    method.before_forward(step)         # e.g. ask for dense gradients at a RigL update
    loss.backward()                     # (AMP: after unscaling the gradients)
    method.after_backward(step)         # gradients are final: regulariser, gradient capture
    method.before_step(step, optimizer) # (a step that is taken) decoupled regulariser, Adam restart
    optimizer.step()
    changed = method.after_step(step + 1, optimizer)   # masks may change here

`step` is the number of optimizer steps done before the hook is called.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import UserError, check_number
from . import powerprop
from .backend_choice import choose_backends
from .distribution import DISTRIBUTIONS
from .layer_types import stores_transposed
from .masking import MaskedWeight, attach, dense_parameter
from .sparse_linear import SparseLinearWeight, attach_sparse, can_run
from .schedule import MaskSchedule
from .selection import select_sparse_layers
from .structure import Blocks

BACKENDS = ("masked", "sparse", "auto")
# How the regulariser meets the optimizer: its gradient added before the step (`coupled`, an
# L2 that Adam then normalises), or θ shrunk by lr·λ·s⊙θ right before the step (`decoupled`,
# as AdamW's weight decay).
REGULARIZATION_FORMS = ("coupled", "decoupled")
# λ over the run: `constant`, or `cosine` from λ to 0 at the last step.
REGULARIZATION_SCHEDULES = ("constant", "cosine")
# Adam moments of an entry that (re-)enters B: `zero` (its first steps are then about
# 1/sqrt(1-β2)·(1-β1) ≈ 3x lr, bias correction using the global step), or `per_entry`: set
# from its first gradient so that its first step is exactly lr·sign(g), as a per-entry bias
# correction would make it.
MOMENT_RESTARTS = ("zero", "per_entry")
# Keys that only shape the optimizer steps still to come: they may change on resume.
OPTIMIZER_KEYS = ("regularization", "regularization_form", "regularization_schedule", "moment_restart")


class SparseLayer:
    """One sparse weight and the single owner of its masks. θ lives in `module`; α = θ ⊙ 1_A
    is what the layer computes with; gradients reach B ⊇ A.

    The masks are stored once, as bool tensors, in the compute side: the backend, swapped per
    layer (`masked`: the `MaskedWeight` parametrization of `module.weight`; `sparse`:
    `SparseLinearWeight`, α compressed and only B trained). `forward` / `backward` read them;
    `set_masks` changes them (the only way to); `pass_dense_gradient` and `use_dense_weights`
    switch how the compute side uses them. Nothing else touches the compute side.
    """

    def __init__(self, name: str, module: nn.Module, k_forward: int, k_backward: int, backend: str = "masked",
                 blocksize: tuple = (1, 1), power: float = 1.0):
        self.name = name  # plain parameter name, e.g. "layer1.0.conv1.weight"
        self.module = module
        self.blocksize = tuple(blocksize)  # (r, r): masks of whole blocks, which `sparse` runs in BSR
        self.transposed = stores_transposed(module)  # weight stored (in, out): transformers' Conv1D
        # Powerpropagation's p: the layer computes with w = θ·|θ|^(p−1) on A (1: with θ)
        self.power = float(power)
        self.k_forward = k_forward
        self.k_backward = k_backward
        self.churn = 0.0  # share of A that changed at the last mask update
        self.promotions = 0.0  # share of A that was in B \\ A before the last mask update
        # masks start empty (no entry in A or B)
        self._compute: MaskedWeight | SparseLinearWeight = self._attach(backend)

    def __repr__(self) -> str:
        return f"SparseLayer({self.name!r}, numel={self.numel}, k_forward={self.k_forward}, k_backward={self.k_backward})"

    @property
    def theta(self) -> nn.Parameter:
        """The dense θ, up to date (the sparse backend writes its trained values back first)."""
        theta = dense_parameter(self.module)
        self._compute.sync(theta)
        return theta

    @property
    def backend(self) -> str:
        return self._compute.backend

    @property
    def trained(self) -> nn.Parameter:
        """The tensor the optimizer trains for this layer: θ (`masked`), or B's values (`sparse`)."""
        return self._compute.trained(dense_parameter(self.module))

    def use_backend(self, backend: str) -> None:
        """Swap the compute side (before an optimizer is built over `trained`); masks stay."""
        if backend == self.backend:
            return
        forward, backward = self.forward, self.backward
        self._compute.detach(self.module)
        self._compute = self._attach(backend)
        self._compute.install(dense_parameter(self.module), forward, backward, None)

    def _attach(self, backend: str) -> MaskedWeight | SparseLinearWeight:
        side = attach_sparse(self.module, self.blocksize) if backend == "sparse" else attach(self.module)
        side.power = self.power
        return side

    def reload(self) -> None:
        """θ was written from outside (a checkpoint): the compute side takes it as it is; the
        next `set_masks` gathers what it trains from it."""
        self._compute.reload(dense_parameter(self.module))

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
        old_forward = self.forward
        if old_forward.any():
            # |A_new Δ A_old| / (|A_old| + |A_new|): the share of A replaced when its size is
            # fixed, and also counts what pruning removes.
            # (count_nonzero: a bool `.sum()` first casts the whole mask to int64)
            sizes = int(torch.count_nonzero(old_forward)) + int(torch.count_nonzero(forward))
            self.churn = float(torch.count_nonzero(forward ^ old_forward)) / max(1, sizes)
            # promotions: the candidates (B \\ A) that earned their way into A
            candidates = self.backward & ~old_forward
            self.promotions = float(torch.count_nonzero(forward & candidates)) / max(1, int(torch.count_nonzero(forward)))
            del candidates
        del old_forward  # the old masks are not held here while the compute side installs the new ones
        if backward is not forward and torch.equal(backward, forward):
            backward = forward  # B = A: one shared mask
        # The compute side installs them: entries leaving B freeze (their optimizer state is
        # zeroed, or dropped with them); the sparse side also re-gathers B's values.
        self._compute.install(self.theta, forward, backward, optimizer)

    def pass_dense_gradient(self, dense: bool) -> None:
        """While on, the backward pass lets every entry's gradient (∂L/∂α) through instead of
        only B's; the masks themselves do not change (RigL's dense-gradient capture). The
        `masked` backend only."""
        self._compute.pass_dense_gradient(dense)

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

    def regularize(self, a: float, b: float) -> None:
        """Add a·θ on A and b·θ on B to the gradient of the trained tensor."""
        self._compute.regularize(dense_parameter(self.module), a, b)

    def decay(self, a: float, b: float) -> None:
        """θ -= a·θ on A and b·θ on B, in place (the decoupled regulariser); outside B
        nothing changes."""
        self._compute.decay(dense_parameter(self.module), a, b)

    @torch.no_grad()
    def magnitudes(self) -> dict[str, torch.Tensor]:
        """|θ| of the entries in A, in B \\ A and outside B (flat tensors, for histograms)."""
        theta = self.theta.detach().abs()
        forward, backward = self.forward, self.backward
        return {"A": theta[forward], "B-A": theta[backward & ~forward], "outside_B": theta[~backward]}

    def held(self) -> dict[str, list[torch.Tensor]]:
        """The tensors the compute side holds by kind (`masks`; `index`: the sparse backend's
        CSR patterns), for memory accounting."""
        return self._compute.held()

    def dense_state(self, state: torch.Tensor) -> torch.Tensor:
        """A per-entry tensor of `trained` (optimizer state) in θ's shape, zero outside B."""
        return self._compute.to_dense(state)

    def trained_state(self, state: torch.Tensor) -> torch.Tensor:
        """Inverse of `dense_state` for the current masks."""
        return self._compute.from_dense(state)


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
    # The backend always may: checkpoints do not depend on it.
    resume_may_change: tuple[str, ...] = ("backend", *OPTIMIZER_KEYS)
    # Needs ∂L/∂α of every weight at some steps (RigL's growth): only the masked backend has it.
    needs_dense_gradient = False
    # When masks change (None: never). Subclasses that change masks set one in __init__.
    schedule: MaskSchedule | None = None
    # The grain masks are chosen at (`structure.Blocks`, `structure.NM`): single weights unless
    # a method is configured otherwise (Top-KAST's sparsity.block / sparsity.pattern).
    structure: Blocks = Blocks()
    # Config keys added after checkpoints were first written, with the value that a
    # checkpoint written without them was trained with (resuming such a run compares these).
    added_keys: dict = {}
    # Options for sparse layers that learn slowly, off here (Top-KAST configures them):
    # Powerpropagation's p, the factor on the initial weights (`initial_scale`) and the
    # learning-rate factor of the sparse layers (`parameter_groups`).
    powerprop: float = 1.0
    alpha_scale: str | float | None = None
    lr_scale: str | float | None = None

    def __init__(
        self,
        forward: float = 0.9,
        backward: float | None = None,
        distribution: str = "uniform",
        dense_first: bool = True,
        dense_layers: list[str] | tuple = (),
        include_embeddings: bool = False,
        regularization: float = 0.0,
        backend: str = "masked",
        regularization_form: str = "coupled",
        regularization_schedule: str = "constant",
        moment_restart: str = "zero",
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
        if backend not in BACKENDS:
            raise UserError(f"sparsity.backend={backend!r} is not known; allowed: {', '.join(BACKENDS)}")
        self.backend = backend
        for key, value, allowed in (("regularization_form", regularization_form, REGULARIZATION_FORMS),
                                    ("regularization_schedule", regularization_schedule, REGULARIZATION_SCHEDULES),
                                    ("moment_restart", moment_restart, MOMENT_RESTARTS)):
            if value not in allowed:
                raise UserError(f"sparsity.{key}={value!r} is not known; allowed: {', '.join(allowed)}")
        self.regularization_form = regularization_form
        self.regularization_schedule = regularization_schedule
        self.moment_restart = moment_restart
        self.total_steps = None
        self.backend_notes: dict[str, str] = {}  # layer -> why `auto` chose its backend
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

    def attach(self, model: nn.Module, total_steps: int | None = None, example: torch.Tensor | None = None) -> "SparsityMethod":
        """Choose the sparse layers of `model`, size their sets and set the first masks.
        Call after moving the model to its device and before building the optimizer.
        `total_steps` (the run's length) turns schedule points given as fractions into steps.
        `example`, an input batch of the run's shape, is what `auto` times each layer on.
        At forward sparsity 0 every method is dense training: nothing is attached."""
        self.total_steps = total_steps
        self.resolve_schedule(total_steps)
        if self.forward_sparsity == 0.0:
            return self
        timed = []
        for pname, name, module, k, k_backward, backend in self.plan(model):
            blocksize = self.structure.blocksize or (1, 1)  # (N:M has none, and stays masked)
            self.layers.append(SparseLayer(pname, module, k, k_backward, "masked" if backend == "auto" else backend,
                                           blocksize, self.powerprop))
            if backend == "auto":
                timed.append(self.layers[-1])
        for layer in self.layers:
            forward, backward = self.initial_masks(layer)
            self.initialize(layer, forward)
            layer.set_masks(forward, backward)
        if timed:
            self.backend_notes.update(choose_backends(model, timed, example))
        return self

    def backend_reason(self, module: nn.Module) -> str | None:
        """Why the sparse backend cannot run `module`'s weight for this method (None: it can)."""
        if self.needs_dense_gradient:
            return f"sparsity={self.name} needs the dense gradient of every weight at its updates"
        if self.structure.sparse_reason():
            return self.structure.sparse_reason()
        if not can_run(module):
            return f"{type(module).__name__}: the sparse backend runs Linear layers and 1x1 convolutions only"
        return None

    def plan(self, model: nn.Module) -> list[tuple[str, str, nn.Module, int, int, str]]:
        """(parameter name, module name, module, k_forward, k_backward, backend) of each layer
        that `attach` makes sparse, or the UserError it would raise (also for a layer or method
        `sparsity.backend=sparse` cannot run). Reads only shapes, so a model built on the meta
        device can be checked before any work is done."""
        chosen = select_sparse_layers(model, self.dense_first, self.dense_layers, self.include_embeddings)
        names = [f"{n}.weight" if n else "weight" for n, _ in chosen]
        shapes = {pname: tuple(m.weight.shape) for pname, (_, m) in zip(names, chosen)}
        for name, module in chosen:
            self.structure.check(name, tuple(module.weight.shape), stores_transposed(module))
        k_forward, k_backward = self.structure.counts(shapes, self.density, self.backward_density, self.distribution)
        plan = []
        for pname, (name, module) in zip(names, chosen):
            numel, k = module.weight.numel(), k_forward[pname]
            if k == 0:
                raise UserError(
                    f"sparsity.forward={self.forward_sparsity} leaves layer {name} ({numel} weights) with no "
                    "weight; lower the sparsity or keep the layer dense (sparsity.dense_layers)"
                )
            backend = self.backend
            if backend != "masked":
                reason = self.backend_reason(module)
                if reason is not None and backend == "sparse":
                    instead = "masked" if self.needs_dense_gradient else f"auto (keeps {name} masked) or masked"
                    raise UserError(
                        f"sparsity.backend=sparse cannot run layer {name}: {reason}; use sparsity.backend={instead}"
                    )
                if reason is not None:
                    backend = "masked"
                    self.backend_notes[name] = f"masked ({reason})"
            plan.append((pname, name, module, k, k_backward[pname], backend))
        return plan

    def resolve_schedule(self, total_steps: int | None) -> None:
        """Turn the schedule's points given as fractions into steps of a run of `total_steps`."""
        if self.schedule is not None:
            self.schedule.resolve(total_steps)

    def initial_masks(self, layer: SparseLayer) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def initialize(self, layer: SparseLayer, forward: torch.Tensor) -> None:
        """θ of a layer just attached, given its first A: the model's initial weights w₀ times
        `initial_scale`, as the θ that Powerpropagation turns back into them (sign(w)·|w|^(1/p)),
        so the layer starts computing with the scaled w₀ on A. Both are monotone in |w|: A and
        B stay the top k. A resumed run loads its θ over this."""
        theta = layer.theta
        scale = initial_scale(self.alpha_scale, theta.detach(), forward)
        if scale != 1.0 or layer.power != 1.0:
            theta.copy_(powerprop.parameter_for(theta.detach() * scale, layer.power))

    def sparse_parameters(self) -> list[nn.Parameter]:
        """The tensors the optimizer trains for the sparse layers, in layer order: θ (`masked`)
        or B's values (`sparse`; θ then needs no gradient). The trainer gives these no
        ordinary weight decay."""
        return [layer.trained for layer in self.layers]

    def parameter_groups(self) -> list[dict]:
        """Optimizer parameter groups of `sparse_parameters`, without ordinary weight decay.
        One group; with `lr_scale` one per layer, in layer order (the same groups on every
        build, so a checkpoint's optimizer state loads), each with its `lr_scale`, the factor
        the optimizer's lr is multiplied by for that layer (`run.build_optimizer`)."""
        if not self.layers:
            return []
        if self.lr_scale is None:
            return [{"params": self.sparse_parameters(), "weight_decay": 0.0}]
        return [{"params": [layer.trained], "weight_decay": 0.0, "lr_scale": layer_lr_scale(self.lr_scale, layer)}
                for layer in self.layers]

    def backends(self) -> dict[str, str]:
        """Each sparse layer's backend (masked or sparse), by parameter name."""
        return {layer.name: layer.backend for layer in self.layers}

    # --------------------------------------------------------- optimizer state
    # A checkpoint stores each sparse layer's per-entry optimizer state in θ's shape, zero
    # outside B, whatever the backend: the masked backend's own layout (so checkpoints written
    # before backends existed read the same), from which the sparse backend gathers B's.
    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict:
        """`optimizer.state_dict()` in the form a checkpoint stores (above)."""
        state = optimizer.state_dict()
        self._convert(optimizer, state, lambda layer, t: layer.dense_state(t), lambda layer: layer.trained.shape)
        return state

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Load optimizer state stored by `optimizer_state_dict` (with the masks loaded first)."""
        state = {**state, "state": dict(state["state"])}
        self._convert(optimizer, state, lambda layer, t: layer.trained_state(t), lambda layer: layer.theta.shape)
        optimizer.load_state_dict(state)

    def _convert(self, optimizer, state: dict, convert, stored_shape) -> None:
        index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
        for layer in self.layers:
            if layer.backend == "masked":
                continue  # stored as it is
            i = index.get(id(layer.trained))
            entry = state["state"].get(i)
            if entry is None:
                continue
            shape = stored_shape(layer)
            state["state"][i] = {
                k: convert(layer, v) if torch.is_tensor(v) and v.dim() and v.shape == shape else v for k, v in entry.items()
            }

    # ------------------------------------------------------------------ hooks
    def before_forward(self, step: int) -> None:
        """Called before the forward pass of optimizer step `step`."""

    @torch.no_grad()
    def after_backward(self, step: int) -> None:
        """Called when the gradients of step `step` are final (unscaled), before clipping.
        `coupled`: adds the regulariser's gradient λ·s⊙θ, s = a·1_A + b·1_B
        (`regularizer_weights`), in place from the layer's bool masks: no per-layer tensor for s."""
        lam = self.regularization_at(step)
        if not lam or self.regularization_form != "coupled":
            return
        for layer in self.layers:
            a, b = self.regularizer_weights(layer)
            layer.regularize(lam * a, lam * b)

    @torch.no_grad()
    def before_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """Called right before the optimizer takes step `step + 1` (not for a skipped step),
        after clipping. `decoupled`: θ shrinks by lr·λ·s⊙θ on B (AdamW's order: decay, then
        the update). `moment_restart=per_entry`: entries with fresh Adam moments get them from
        this gradient."""
        lam = self.regularization_at(step)
        if lam and self.regularization_form == "decoupled":
            rates = _learning_rates(optimizer)
            for layer in self.layers:
                lr = rates.get(id(layer.trained))
                if lr:
                    a, b = self.regularizer_weights(layer)
                    layer.decay(lr * lam * a, lr * lam * b)
        if self.moment_restart == "per_entry":
            for layer in self.layers:
                restart_moments(optimizer, layer.trained)

    def regularization_at(self, step: int) -> float:
        """λ at step `step` (the schedule over the run's `total_steps`)."""
        lam = self.regularization_scale
        if self.regularization_schedule == "cosine" and lam and self.total_steps:
            lam *= 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / self.total_steps)))
        return lam

    def after_step(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> bool:
        """Called after optimizer step number `step` (1-based). Returns True if masks changed."""
        return False

    @torch.no_grad()
    def regularization(self) -> float | None:
        """λ/2 · Σ s⊙θ², summed over layers (coupled: its gradient is added; decoupled: lr x its
        gradient is taken off θ); None if λ = 0."""
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

    @torch.no_grad()
    def mask_digests(self) -> dict[str, torch.Tensor]:
        """Per layer, [|A|, |B|, hash of A, hash of B] (int64): equal digests mean equal masks,
        but for a chance collision. Cheap enough to compare across processes at every update."""
        def digest(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            idx = mask.reshape(-1).nonzero().squeeze(1)
            # Knuth's multiplicative hash of each index, summed: order-free and int64-safe
            # (index < 2^31, factor < 2^32).
            return torch.tensor(idx.numel()), ((idx * 2654435761) % 2147483647).sum().cpu()

        out = {}
        for layer in self.layers:
            (na, ha), (nb, hb) = digest(layer.forward), digest(layer.backward)
            out[layer.name] = torch.stack([na, nb, ha, hb])
        return out

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
    @torch.no_grad()
    def magnitudes(self, limit: int = 1 << 16) -> dict[str, torch.Tensor]:
        """|θ| in A, in B \\ A and outside B over all sparse layers, each a strided sample of at
        most `limit` values (no RNG drawn), for histograms; empty without sparse layers."""
        parts: dict[str, list[torch.Tensor]] = {}
        # Thinned on the device before the copy: only about `limit` values per kind leave it.
        stride = max(1, -(-sum(layer.numel for layer in self.layers) // limit))
        for layer in self.layers:
            for key, values in layer.magnitudes().items():
                parts.setdefault(key, []).append(values[::stride].float().cpu())
        out = {}
        for key, values in parts.items():
            flat = torch.cat(values)
            out[key] = flat[:: max(1, -(-flat.numel() // limit))]
        return out

    def report(self, step: int) -> dict:
        """The sparsity record (one line of sparsity.jsonl), measured from the masks."""
        layers, n, nf, nb = {}, 0, 0, 0
        for layer in self.layers:
            f, b = int(torch.count_nonzero(layer.forward)), int(torch.count_nonzero(layer.backward))
            layers[layer.name] = {
                "numel": layer.numel,
                "forward_density": f / layer.numel,
                "backward_density": b / layer.numel,
                "churn": layer.churn,
                "promotions": layer.promotions,
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
        """The method's checkpoint state. Reading `theta` first brings each dense θ up to date
        (the sparse backend holds the trained values apart), so save this before the model."""
        for layer in self.layers:
            layer.theta  # noqa: B018 (the read syncs)
        return {
            "method": self.name,
            "masks": {l.name: {"forward": l.forward.cpu(), "backward": l.backward.cpu()} for l in self.layers},
            "churn": {l.name: l.churn for l in self.layers},
            "promotions": {l.name: l.promotions for l in self.layers},
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
            layer.reload()  # θ was just loaded: set_masks gathers the trained values from it
            try:
                layer.set_masks(forward, backward)  # B = A: one shared mask again
            except ValueError as e:
                raise UserError(f"checkpoint masks do not fit this model: {e}") from None
            layer.churn = state.get("churn", {}).get(layer.name, 0.0)
            layer.promotions = state.get("promotions", {}).get(layer.name, 0.0)
        self.load_extra_state(state.get("extra") or {})

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass


def initial_scale(option: str | float | None, w: torch.Tensor, forward: torch.Tensor) -> float:
    """The factor `sparsity.alpha_scale` multiplies a layer's initial weights w by. "rms":
    ‖w‖/‖w ⊙ 1_A‖, so the weights the layer computes with at init have the dense layer's sum
    of squares; for inputs of uncorrelated entries with equal variance its outputs then have
    the dense layer's variance (averaged over units). A random A would give 1/sqrt(D); A holds
    the top-k |w|, which already carry more than D of the sum, so the factor is smaller.
    A number: that number. None: 1."""
    if option is None:
        return 1.0
    if option != "rms":
        return float(option)
    kept = float(torch.linalg.vector_norm(w[forward], dtype=torch.float64))
    return float(torch.linalg.vector_norm(w, dtype=torch.float64)) / kept if kept > 0 else 1.0


def layer_lr_scale(option: str | float, layer: SparseLayer) -> float:
    """The factor `sparsity.lr_scale` puts on a sparse layer's learning rate. "density": 1/D,
    D the layer's forward density. Why: a step moves every trained entry by about lr (Adam),
    or by lr·g; only A's entries change the layer's output, and a unit sums D·fan-in of them,
    so per step a sparse layer's output moves D times as far as the dense layer's (the
    fan-in argument of μP: Adam's lr ∝ 1/fan-in). 1/D gives the sparse layer the dense
    layer's speed. It also moves B \\ A's entries 1/D times faster, so a number below 1 is
    the way to test the other reading (lr drift ranking B, not importance). A number: it."""
    return 1.0 / layer.density if option == "density" else float(option)


def _learning_rates(optimizer: torch.optim.Optimizer | None) -> dict[int, float]:
    """The lr of each parameter, by id."""
    if optimizer is None:
        return {}
    return {id(p): float(g["lr"]) for g in optimizer.param_groups for p in g["params"]}


@torch.no_grad()
def restart_moments(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> None:
    """Adam-family state of `param`: the entries whose moments are zero (they just entered B:
    their state was zeroed or dropped when they left it) but whose gradient is not, get
    m = g·(1-β1^t) and v = g²·(1-β2^t) after this step (t: the step about to be taken), so the
    bias-corrected moments are g and g²: a first step of lr·sign(g), as a per-entry bias
    correction would give, instead of about 3x lr. Others are untouched. No-op for optimizers
    without `exp_avg`/`exp_avg_sq` (SGD) and before the optimizer's first step."""
    state = optimizer.state.get(param)
    grad = param.grad
    if not state or grad is None or "exp_avg_sq" not in state or "exp_avg" not in state:
        return
    m, v = state["exp_avg"], state["exp_avg_sq"]
    if m.shape != grad.shape:
        return
    fresh = (v == 0) & (grad != 0)
    if not bool(fresh.any()):
        return
    group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
    beta1, beta2 = group["betas"]
    t = float(state["step"]) + 1.0
    c1, c2 = 1.0 - beta1**t, 1.0 - beta2**t
    # Adam updates m = β1·m0 + (1-β1)·g and v = β2·v0 + (1-β2)·g²: choose m0, v0 for the targets.
    m.copy_(torch.where(fresh, grad * ((c1 - (1.0 - beta1)) / beta1), m))
    v.copy_(torch.where(fresh, grad.square() * ((c2 - (1.0 - beta2)) / beta2), v))
    if "max_exp_avg_sq" in state:  # amsgrad
        state["max_exp_avg_sq"].copy_(torch.where(fresh, v, state["max_exp_avg_sq"]))
