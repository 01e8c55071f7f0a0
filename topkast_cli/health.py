"""Collapse detection: a network that stopped learning says so, once, instead of ending at
chance accuracy in silence.

Two signs, checked at the log interval:
- the training loss stays at chance level (at least 95% of the loss of a uniform guess,
  ln(number of classes)) for `trainer.collapse_window` steps;
- a sparse layer's outputs stay <= 0 on a whole batch for that long: the ReLU after it
  passes only zeros (dead units), so nothing behind it can learn.

Either logs one warning that names the layer, the likely cause and the remedies; with
`trainer.collapse_stop=true` the run stops there with exit 1 and that line as its reason.
"""

from __future__ import annotations

import logging
import math

import torch

from .errors import RunFailed

log = logging.getLogger("topkast")

CHANCE_SHARE = 0.95  # a loss above this share of ln(classes) is "at chance level"


def chance_loss(output: torch.Tensor) -> float | None:
    """Cross-entropy of a uniform guess over the output's last dimension (classes or
    vocabulary); None when the output is not logits of that kind."""
    if output.dim() < 2 or output.shape[-1] < 2:
        return None
    return math.log(output.shape[-1])


class CollapseWatch:
    """Watches one run. `before_step(step)` arms the dead-unit probe for the step that ends a
    log interval (one reduction per sparse layer then, nothing at the other steps);
    `check(step, train_loss, output)` after that interval's training scalars."""

    def __init__(self, method, window: int | None, stop: bool, log_every: int, all_max=None):
        self.method, self.window, self.stop, self.log_every = method, window, bool(stop), log_every
        # Several ranks: the element-wise max over ranks of a list of ints, so that every rank
        # sees the same signs (a layer is dead when it is on every rank's share of the batch).
        self.all_max = all_max
        self.warned = False
        self.armed = False
        self.since: dict[str, int] = {}  # sign -> the log step its current streak was first seen at
        self.dead: dict[str, bool] = {}  # layer name -> outputs <= 0 at the last probe
        self._hooks = []
        if window is not None:
            for layer in method.layers:
                name = layer.name.removesuffix(".weight")
                self._hooks.append(layer.module.register_forward_hook(self._probe(name)))

    def _probe(self, name: str):
        def hook(module, inputs, output):
            if self.armed and module.training and torch.is_tensor(output):
                self.dead[name] = bool(output.detach().amax() <= 0)
        return hook

    def before_step(self, step: int) -> None:
        """Called before optimizer step `step + 1`."""
        self.armed = self.window is not None and not self.warned and (step + 1) % self.log_every == 0

    def check(self, step: int, train_loss: float, output: torch.Tensor) -> str | None:
        """After the training scalars of `step`: the warning if a sign has lasted the window
        (raises RunFailed with it when asked to stop), else None."""
        self.armed = False
        if self.window is None or self.warned:
            return None
        chance = chance_loss(output)
        signs = {name: dead for name, dead in self.dead.items()}
        if self.all_max is not None and signs:
            alive = self.all_max([int(not dead) for dead in signs.values()])
            signs = {name: not a for name, a in zip(signs, alive)}
        signs["loss"] = chance is not None and math.isfinite(train_loss) and train_loss >= CHANCE_SHARE * chance
        for sign, on in signs.items():
            if not on:
                self.since.pop(sign, None)
            else:
                self.since.setdefault(sign, step)
        # a streak first seen at step s may have begun right after the log step before it
        lasting = [s for s, first in self.since.items() if step - first + self.log_every >= self.window]
        if not lasting:
            return None
        self.warned = True
        message = self.message(step, lasting, train_loss, chance)
        if self.stop:
            raise RunFailed(message)
        log.warning(message)
        return message

    def message(self, step: int, lasting: list[str], train_loss: float, chance: float | None) -> str:
        m = self.method
        dead = sorted((s for s in lasting if s != "loss"), key=self.since.get)
        if dead:
            what = (f"collapse at step {step}: layer {', '.join(dead)} outputs only values <= 0 since step "
                    f"{min(self.since[s] for s in dead)} (the ReLUs after it are all dead; nothing behind it learns)")
        else:
            what = (f"collapse at step {step}: the training loss has stayed at chance level since step "
                    f"{self.since['loss']} ({train_loss:.3f}, chance {chance:.3f})")
        cause = ("likely cause: too few weights per unit at forward sparsity "
                 f"{m.forward_sparsity:g}, pushed below zero by large early steps (Adam) and the regulariser")
        remedies = []  # the one that saved the measured collapses first (bench/results/ablation_mnist1d.md)
        if getattr(m, "regularization_form", "decoupled") != "decoupled" and m.regularization_scale:
            remedies.append("sparsity.regularization_form=decoupled")
        remedies.append("lower optimizer.lr")
        if getattr(m, "distribution", "erk") != "erk":
            remedies.append("sparsity.distribution=erk")
        if getattr(m, "keep_units", True) is False:
            remedies.append("sparsity.keep_units=true")
        if not self.stop:
            remedies.append("trainer.collapse_stop=true stops such runs")
        return f"{what}; {cause}; remedies: {', '.join(remedies)}"

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
