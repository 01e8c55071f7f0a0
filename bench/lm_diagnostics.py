"""Why sparse Transformers learn slowly: per-layer measures of Top-KAST's mask refreshes on the
character LM, read from outside the sparsity library (each sparse layer's masks, θ and
gradient, and what the optimizer step did to θ).

    python -m bench.lm_diagnostics [overrides...] --steps 2000 --every 100 --out lm_diagnostics.csv

The run is built by the trainer's own builder and stepped by its `train_step` (as
`bench.speed`), on the LM bench's model and data with the tool's LM defaults; overrides go
on top (e.g. `sparsity.forward=0.9 sparsity.backward=0.8`). At each refresh (at most one per
`--every` steps) it writes one CSV row per sparse layer, describing that refresh and the steps
since the one before (COLUMNS), and a markdown summary beside the CSV.

The hypothesis under test (issue 18): Adam moves every entry of B by about lr per step
whatever its gradient, so the refresh may rank Adam's drift rather than importance. If
promotions follow the gradient, most promoted entries have an accumulated gradient in the top
half of B \\ A's (`promoted_grad_top_half` near 1); under drift, about half do.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from topkast_cli.loop import train_step
from topkast_cli.run import kept_torch_settings
from topkast_cli.tasks import evaluate

from . import speed
from .lm import MODEL, SHAKESPEARE

DEFAULTS = [*MODEL, "sparsity=topkast", "sparsity.forward=0.8", "sparsity.backward=0.6", "sparsity.backend=masked",
            "trainer.threads=1", "trainer.tensorboard=false", "trainer.checkpoint_every=null"]
COLUMNS = {
    "step": "the step after which the masks were refreshed",
    "layer": "sparse layer",
    "lr": "learning rate of the layer at that step",
    "churn": "share of A replaced at this refresh",
    "promotions": "share of the new A that was in B \\ A (candidates that earned their way in)",
    "from_outside_B": "share of the new A that was outside B (entries that did not move)",
    "from_A0": "share of A that was in the initial top-k A₀",
    "rms_A": "RMS of θ over A",
    "rms_alpha": "RMS of α = θ ⊙ 1_A over the whole layer (the scale the layer computes with)",
    "rms_theta": "RMS of the whole θ",
    "rms_init": "RMS of θ at step 0 (the dense initialisation)",
    "abs_A": "mean |θ| over the old A",
    "abs_BA": "mean |θ| over the old B \\ A",
    "threshold": "k-th largest |θ|: the smallest |θ| that is in A",
    "update_A": "mean |Δθ| per step since the last refresh on A (the optimizer's step, with the regulariser)",
    "update_BA": "mean |Δθ| per step since the last refresh on B \\ A",
    "steps_to_threshold": "threshold / update_BA: steps at B \\ A's mean update to travel from 0 to the threshold",
    "promoted_grad_top_half": "share of the promotions whose |Σ gradient| since the last refresh is above the median of B \\ A's",
    "consistency_promoted": "mean |Σ g| / Σ |g| since the last refresh over the promotions (1: the gradient's sign never changed)",
    "consistency_BA": "the same over all of the old B \\ A",
}


def _count(mask: torch.Tensor) -> int:
    return int(torch.count_nonzero(mask))


def _rms(x: torch.Tensor) -> float:
    return float(x.float().square().mean().sqrt()) if x.numel() else math.nan


def _mean(x: torch.Tensor) -> float:
    return float(x.float().mean()) if x.numel() else math.nan


class Watch:
    """One sparse layer between two refreshes: the masks in force, the gradient summed since
    (per entry), and the optimizer's steps on A and on B \\ A."""

    def __init__(self, layer, lr_of):
        self.layer, self.lr_of = layer, lr_of
        self.a0 = layer.forward.clone()
        self.rms_init = _rms(layer.theta.detach())
        self.reset()

    def reset(self) -> None:
        # (clones: the library's masks are its own; these are the sets of the coming steps)
        self.A, self.B = self.layer.forward.clone(), self.layer.backward.clone()
        self.grad_sum = torch.zeros_like(self.layer.theta, dtype=torch.float32)
        self.grad_abs = torch.zeros_like(self.grad_sum)
        self.update_A = self.update_BA = 0.0
        self.steps = 0

    def before_step(self) -> None:
        self.before = self.layer.theta.detach().clone()

    @torch.no_grad()
    def after_step(self) -> None:
        """The step under the sets in force before any refresh it ended with."""
        delta = (self.layer.theta.detach() - self.before).abs()
        self.update_A += _mean(delta[self.A])
        self.update_BA += _mean(delta[self.B & ~self.A])
        grad = self.layer.trained.grad  # θ's shape on the masked backend; 0 outside B
        if grad is not None:
            self.grad_sum += grad
            self.grad_abs += grad.abs()
        self.steps += 1

    @torch.no_grad()
    def record(self, step: int) -> dict:
        theta = self.layer.theta.detach()
        size = theta.abs()
        A = self.layer.forward
        old_A, candidates = self.A, self.B & ~self.A
        promoted = A & candidates
        k, n = max(1, _count(A)), max(1, self.steps)
        threshold = float(size.flatten().topk(_count(A)).values[-1]) if _count(A) else math.nan
        update_BA = self.update_BA / n
        score = self.grad_sum.abs()
        consistency = score / self.grad_abs.clamp_min(1e-30)
        median = score[candidates].median() if candidates.any() else None
        return {
            "step": step, "layer": self.layer.name, "lr": self.lr_of(self.layer),
            "churn": _count(A & ~old_A) / k,
            "promotions": _count(promoted) / k,
            "from_outside_B": _count(A & ~self.B) / k,
            "from_A0": _count(A & self.a0) / k,
            "rms_A": _rms(theta[A]), "rms_alpha": _rms(theta * A), "rms_theta": _rms(theta), "rms_init": self.rms_init,
            "abs_A": _mean(size[old_A]), "abs_BA": _mean(size[candidates]),
            "threshold": threshold,
            "update_A": self.update_A / n, "update_BA": update_BA,
            "steps_to_threshold": threshold / update_BA if update_BA > 0 else math.nan,
            "promoted_grad_top_half": _mean((score[promoted] > median).float()) if median is not None else math.nan,
            "consistency_promoted": _mean(consistency[promoted]),
            "consistency_BA": _mean(consistency[candidates]),
        }


def diagnose(overrides: list[str], steps: int, every: int, where: Path) -> tuple[list[dict], dict]:
    """Train `steps` steps; the per-layer records and the final val metrics."""
    run, _, params = speed.make_run(overrides, where, max_steps=steps, cached=0)
    layers = run.method.layers
    if not layers:
        sys.exit("lm_diagnostics: the run has no sparse layers (a sparse method with sparsity.forward > 0 is needed)")
    if any(layer.backend != "masked" for layer in layers):
        sys.exit("lm_diagnostics: reads θ's gradient in θ's shape; use sparsity.backend=masked")
    groups = {id(p): g for g in run.optimizer.param_groups for p in g["params"]}
    lr_of = lambda layer: groups[id(layer.trained)]["lr"]  # noqa: E731 (read when recorded: the schedule moves it)
    watches = [Watch(layer, lr_of) for layer in layers]
    records, last_recorded = [], 0
    spe = run.data.steps_per_epoch
    while run.step < steps:
        epoch, offset = divmod(run.step, spe)
        for x, y in run.data.train_loader(epoch, run.cfg.seed, offset):
            for w in watches:
                w.before_step()
            _, _, changed = train_step(run, x.to(run.device), y.to(run.device), params)
            for w in watches:
                w.after_step()
            if changed:
                if run.step - last_recorded >= every:
                    records += [w.record(run.step) for w in watches]
                    last_recorded = run.step
                for w in watches:
                    w.reset()
            if run.step >= steps:
                break
    final = evaluate(run.model, run.data.eval_loader("val"), run.task, run.device, run.autocast)
    return records, {"metric": run.task.metric, **final}


def summary(records: list[dict], final: dict, overrides: list[str], steps: int) -> str:
    """Means over layers at up to 12 recorded steps, per-layer means over the run, the legend."""
    metric = final["metric"]
    text = (f"# Top-KAST refresh diagnostics, character LM\n\n`python -m bench.lm_diagnostics {' '.join(overrides)}`: "
            f"{steps} steps, final val {metric} {final[metric]:.3f}. "
            "Drift or importance: `promoted_grad_top_half` near 1 means the promotions follow the gradient, "
            "near 0.5 that they are as likely among small gradients (Adam's drift).\n\n")
    if not records:
        return text + "No refresh was recorded.\n"

    def mean(rows, key):
        values = [r[key] for r in rows if not math.isnan(r[key])]
        return statistics.fmean(values) if values else math.nan

    shown = ["churn", "promotions", "from_A0", "promoted_grad_top_half", "consistency_promoted", "consistency_BA", "steps_to_threshold"]
    head = [*shown, "rms_alpha / rms_init", "update_BA / threshold"]
    by_step = {}
    for r in records:
        by_step.setdefault(r["step"], []).append(r)
    picked = list(by_step)[:: max(1, math.ceil(len(by_step) / 12))]
    text += "## Mean over layers, by step\n\n| step | " + " | ".join(head) + " |\n|---|" + "---|" * len(head) + "\n"
    for s in picked:
        rows = by_step[s]
        cells = [mean(rows, k) for k in shown]
        cells += [statistics.fmean(r["rms_alpha"] / r["rms_init"] for r in rows), mean(rows, "update_BA") / mean(rows, "threshold")]
        text += f"| {s} | " + " | ".join(f"{c:.3g}" for c in cells) + " |\n"
    by_layer = {}
    for r in records:
        by_layer.setdefault(r["layer"], []).append(r)
    text += ("\n## Per layer, mean over the refreshes (from_A0 and RMS: at the last one)\n\n"
             "| layer | churn | promotions | promoted_grad_top_half | from_A0 | rms_alpha / rms_init |\n|---|---|---|---|---|---|\n")
    for name, rows in by_layer.items():
        last = rows[-1]
        text += (f"| {name} | {mean(rows, 'churn'):.3g} | {mean(rows, 'promotions'):.3g} | "
                 f"{mean(rows, 'promoted_grad_top_half'):.3g} | {last['from_A0']:.3g} | {last['rms_alpha'] / last['rms_init']:.3g} |\n")
    text += "\n## Columns (CSV)\n\n" + "".join(f"- `{k}`: {v}\n" for k, v in COLUMNS.items())
    return text


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m bench.lm_diagnostics", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="config overrides on top of the LM bench's model and Top-KAST 80/60")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--every", type=int, default=0, help="record at most one refresh per this many steps (0: every one)")
    parser.add_argument("--out", type=Path, default=Path("lm_diagnostics.csv"), help="the CSV; the summary goes beside it (.md)")
    args = parser.parse_args(argv)
    if not SHAKESPEARE.is_file() and not any(o.startswith("dataset.path=") for o in args.overrides):
        sys.exit(f"lm_diagnostics: {SHAKESPEARE} is absent; give dataset.path=FILE")
    with tempfile.TemporaryDirectory() as tmp, kept_torch_settings():
        records, final = diagnose([*DEFAULTS, *args.overrides], args.steps, args.every, Path(tmp))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(COLUMNS))
        writer.writeheader()
        writer.writerows(records)
    md = args.out.with_suffix(".md")
    md.write_text(summary(records, final, args.overrides, args.steps))
    print(f"wrote {args.out} and {md}")
    return args.out


if __name__ == "__main__":
    main()
