"""The accuracy suite: small tasks from different model families, on which the methods'
defaults are chosen by their worst case, not by one bench.

    python -m bench suite                      # every method on every task, 3 seeds (about 40 min on 2 cores)
    python -m bench.suite --quick              # a smoke run (numbers mean nothing)
    python -m bench.suite --settings NAME,...  # candidate defaults (SETTINGS) against the methods' current ones

Each run is one `topkast train` job (the same config composition and training function as
the CLI), run in-process by a pool of worker processes on one thread each, so the grid
costs no interpreter start per run. A finished run of the same composed config is not run
again (a changed default runs it again): the grid can grow between calls (`--runs` keeps
them; delete it after changing the code).

The gap to dense is measured on each task's own metric: accuracy points (dense − method),
or for language models the bits per character in percent of dense (100·(method − dense)/dense).
Both say "how much worse than dense", so one worst case spans the suite.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from .common import RESULTS, header, write

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


@dataclass(frozen=True)
class Task:
    title: str
    family: str
    overrides: tuple[str, ...]
    quick: tuple[str, ...] = ()  # what makes it a smoke run
    metric: str = "acc1"  # acc1 (higher is better) or bpc (lower is better)
    chance: float = 10.0  # the metric of a network that learned nothing (collapse check)
    needs: Path | None = None  # a data file; the task is skipped without it

    @property
    def lower_is_better(self) -> bool:
        return self.metric == "bpc"

    def available(self) -> bool:
        return self.needs is None or self.needs.is_file()


ADAM = ("optimizer=adam",)
SGD = ("optimizer=sgd", "optimizer.lr=0.05", "scheduler=cosine", "scheduler.warmup=0.05")
TASKS: dict[str, Task] = {
    "mnist1d_cnn": Task(
        "MNIST-1D, cnn1d 25 channels, strides 2-1-1 (the default model), Adam 1e-2, 1500 steps", "1-D CNN",
        ("model=cnn1d", "dataset=mnist1d", *ADAM, "trainer.max_steps=1500"), ("model.channels=8",)),
    "mnist1d_cnn_wide_s2": Task(
        "MNIST-1D, cnn1d 64 channels, strides 2-2-2, Adam 3e-3, 1500 steps", "1-D CNN",
        ("model=cnn1d", "model.channels=64", "model.strides=[2,2,2]", "dataset=mnist1d", *ADAM, "optimizer.lr=0.003",
         "trainer.max_steps=1500"), ("model.channels=8",)),
    "mnist1d_mlp_sgd": Task(
        "MNIST-1D, MLP 40-256-256-10, SGD + Nesterov momentum 0.05, cosine, 2000 steps", "MLP, SGD",
        ("model=mlp", "dataset=mnist1d", *SGD, "trainer.max_steps=2000"), ("model.hidden=[16]",)),
    "digits_mlp": Task(
        "digits, MLP 64-256-256-10, Adam 1e-3, 800 steps", "MLP",
        ("model=mlp", "dataset=digits", *ADAM, "optimizer.lr=0.001", "trainer.max_steps=800"), ("model.hidden=[16]",)),
    "digits_cnn_bn": Task(
        "digits, cnn2d 32-64 channels with batch norm, Adam 3e-3, 600 steps", "2-D CNN, batch norm",
        ("model=cnn2d", "dataset=digits", *ADAM, "optimizer.lr=0.003", "trainer.max_steps=600"), ("model.channels=[4,8]",)),
    "digits_wrn_sgd": Task(
        "digits, WRN-10-1 (pre-activation ResNet, batch norm), SGD + Nesterov momentum 0.05, cosine, 600 steps",
        "ResNet, batch norm, SGD",
        ("model=wrn22_2", "model.depth=10", "model.width=1", "dataset=digits", *SGD, "trainer.max_steps=600"), ()),
    "shakespeare_lm": Task(
        "Tiny Shakespeare, character Transformer 2 layers x 64, context 64, AdamW 3e-3, cosine, clip 1, 500 steps",
        "Transformer LM",
        ("model=transformer", "model.layers=2", "model.width=64", "model.heads=2", "dataset=textfile",
         f"dataset.path={SHAKESPEARE}", "dataset.context=64", "dataset.batch_size=32", "dataset.val_fraction=0.05",
         "optimizer=adamw", "optimizer.lr=0.003", "scheduler=cosine", "scheduler.warmup=0.05", "trainer.grad_clip=1.0",
         "trainer.max_steps=500"),
        ("model.layers=1", "model.width=16", "dataset.context=16"), metric="bpc", chance=4.0, needs=SHAKESPEARE),
}

# Full-length runs, reported beside the suite but never used to choose a default: the default
# task as `topkast train` runs it, and the MNIST-1D paper's CNN (strides 2-2-2; DESIGN.md §4),
# dense and Top-KAST with the former and the current defaults.
CHECKS: dict[str, Task] = {
    "default_task": Task("`topkast train` as it comes: MNIST-1D, cnn1d 25 channels, strides 2-1-1, Adam 1e-2, 6000 steps",
                         "1-D CNN", ("model=cnn1d", "dataset=mnist1d"), ("trainer.max_steps=8", "model.channels=8")),
    "paper_cnn": Task("MNIST-1D paper's CNN: cnn1d 25 channels, strides 2-2-2, Adam 1e-2, 6000 steps (DESIGN.md §4)",
                      "1-D CNN", ("model=cnn1d", "model.strides=[2,2,2]", "dataset=mnist1d"), ("trainer.max_steps=8", "model.channels=8")),
}
CHECK_METHODS = {"default_task": ["dense", "topkast90", "topkast95", "rigl95", "set95"],
                 "paper_cnn": ["dense", "topkast90", "topkast95"]}

# The methods, each with its defaults (conf/sparsity/); name -> (method, forward sparsity)
METHODS: dict[str, tuple[str, float]] = {
    "dense": ("dense", 0.0),
    "topkast80": ("topkast", 0.8), "topkast90": ("topkast", 0.9), "topkast95": ("topkast", 0.95),
    "rigl90": ("rigl", 0.9), "rigl95": ("rigl", 0.95),
    "set90": ("set", 0.9), "set95": ("set", 0.95),
    "gmp90": ("gmp", 0.9), "gmp95": ("gmp", 0.95),
}
SPARSE = [m for m in METHODS if m != "dense"]

# Candidate settings for the defaults, tried on the always-sparse methods at 90% and 95%
# (`--settings`): name -> (methods it applies to, overrides on top of each method's config).
FORMER = ("sparsity.regularization_form=coupled", "sparsity.regularization=0.005")
DYNAMIC = ("topkast", "rigl", "set")
SETTINGS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "current": (DYNAMIC, ()),
    "former": (DYNAMIC, FORMER),
    "none": (DYNAMIC, ("sparsity.regularization=0",)),
}
for lam in (0.0002, 0.0005, 0.002, 0.02):
    SETTINGS[f"coupled_{lam:g}"] = (DYNAMIC, ("sparsity.regularization_form=coupled", f"sparsity.regularization={lam:g}"))
for lam in (0.01, 0.02, 0.05):
    SETTINGS[f"decoupled_{lam:g}"] = (DYNAMIC, ("sparsity.regularization_form=decoupled", f"sparsity.regularization={lam:g}"))
# the schedule and the restart of Adam moments, on top of a regulariser setting
for base in ("current", "former", "coupled_0.0002", "coupled_0.0005", "coupled_0.002"):
    prefix = "" if base == "current" else f"{base}+"
    SETTINGS[prefix + "per_entry"] = (DYNAMIC, (*SETTINGS[base][1], "sparsity.moment_restart=per_entry"))
    for r in (1, 2, 5, 10, 100):
        SETTINGS[f"{prefix}refresh_{r}"] = (("topkast",), (*SETTINGS[base][1], f"sparsity.refresh_interval={r}"))
    for e in ("0.5", "null"):
        SETTINGS[f"{prefix}explore_{e}"] = (("topkast",), (*SETTINGS[base][1], f"sparsity.exploration_steps={e}"))
# Top-KAST's options for sparse layers that learn slowly (README), on the current defaults
for p in (1.5, 2, 3):
    SETTINGS[f"powerprop_{p:g}"] = (("topkast",), (f"sparsity.powerprop={p:g}",))
SETTINGS["alpha_rms"] = (("topkast",), ("sparsity.alpha_scale=rms",))
SETTINGS["lr_density"] = (("topkast",), ("sparsity.lr_scale=density",))
SETTINGS["lr_0.5"] = (("topkast",), ("sparsity.lr_scale=0.5",))
SETTINGS["powerprop_2+alpha_rms"] = (("topkast",), ("sparsity.powerprop=2", "sparsity.alpha_scale=rms"))

COMMON = ("trainer.threads=1", "trainer.progress=false", "trainer.tensorboard=false", "trainer.eval_every=null",
          "trainer.checkpoint_every=null", "trainer.log_every=100", "trainer.collapse_window=null")
SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class Job:
    setting: str
    task: str
    method: str
    seed: int
    overrides: tuple[str, ...] = field(compare=False)
    run_dir: Path = field(compare=False)


def jobs_for(root: Path, setting: str, extra: tuple[str, ...], tasks: list[str], methods: list[str], seeds, quick: bool) -> list[Job]:
    out = []
    for t in tasks:
        task = task_named(t)
        for m in methods:
            method, forward = METHODS[m]
            base = [*task.overrides, *(task.quick if quick else ()), f"sparsity={method}"]
            if method != "dense":
                base.append(f"sparsity.forward={forward}")
            for seed in seeds:
                overrides = (*base, *extra, *COMMON, *(("trainer.max_steps=8",) if quick else ()), f"seed={seed}")
                out.append(Job(setting, t, m, seed, overrides, root / setting / t / m / f"seed{seed}"))
    return out


# ------------------------------------------------------------------ running
def _init_worker() -> None:
    import logging

    import torch

    torch.set_num_threads(1)
    logging.getLogger("topkast").setLevel(logging.ERROR)


def run_job(job: Job) -> dict:
    """Train one job in this process (a worker) unless its run directory holds a finished
    run of the same composed config (`config.yaml` beside `summary.json`: a run made before
    a default changed, or one that was interrupted, is run again); its summary, or a failed
    record."""
    from omegaconf import OmegaConf

    from topkast_cli.commands.train import train
    from topkast_cli.config import compose, without_hydra

    cfg = without_hydra(compose("train", list(job.overrides)))
    summary, config = job.run_dir / "summary.json", job.run_dir / "config.yaml"
    if summary.is_file() and config.is_file() and config.read_text() == OmegaConf.to_yaml(cfg):
        done = json.loads(summary.read_text())
        if done.get("status") in ("completed", "failed"):  # (an interrupted run is run again)
            return done
    shutil.rmtree(job.run_dir, ignore_errors=True)
    job.run_dir.mkdir(parents=True)
    config.write_text(OmegaConf.to_yaml(cfg))
    try:
        train(cfg, job.run_dir)
    except (Exception, SystemExit) as e:  # a failed run is a row of the table
        if not summary.is_file():
            return {"status": "failed", "error": str(e).splitlines()[0] if str(e) else type(e).__name__}
    return json.loads(summary.read_text())


def run_all(jobs: list[Job], workers: int, run: bool = True) -> dict[Job, dict]:
    """The summaries of `jobs`, trained by `workers` processes; `run=False`: only the runs
    that exist (whatever config they had)."""
    import multiprocessing

    import torch
    from tqdm import tqdm

    torch.set_num_threads(1)  # (as every run: the results' header says so)
    if not run:
        found = {j: json.loads((j.run_dir / "summary.json").read_text()) for j in jobs if (j.run_dir / "summary.json").is_file()}
        return {j: s for j, s in found.items() if s.get("status") != "interrupted"}
    os.environ["OMP_NUM_THREADS"] = "1"  # (the workers inherit it)
    results = {}
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker) as pool:
        futures = {pool.submit(run_job, j): j for j in jobs}
        for f in tqdm(as_completed(futures), total=len(futures), desc="suite", unit="run", dynamic_ncols=True):
            results[futures[f]] = f.result()
    return results


# ------------------------------------------------------------------ measures
def final(summary: dict, metric: str) -> float | None:
    value = (summary.get("final") or {}).get(metric) if summary.get("status") == "completed" else None
    return None if value is None or not math.isfinite(value) else float(value)


def gap(task: Task, value: float, dense: float) -> float:
    """How much worse than dense: accuracy points, or % of dense bpc."""
    return 100.0 * (value - dense) / dense if task.lower_is_better else dense - value


def collapsed(task: Task, value: float | None) -> bool:
    """At chance level: within 1.5x of chance accuracy (or bpc above `chance`), or failed."""
    if value is None:
        return True
    return value >= task.chance if task.lower_is_better else value <= 1.5 * task.chance


def task_named(name: str) -> Task:
    return TASKS.get(name) or CHECKS[name]


class Results:
    """Finals by (setting, task, method) over seeds, and gaps against the dense runs of the
    same task ('current' setting)."""

    def __init__(self, results: dict[Job, dict]):
        self.values: dict[tuple[str, str, str], list[float | None]] = {}
        for job, summary in sorted(results.items(), key=lambda kv: kv[0].seed):
            self.values.setdefault((job.setting, job.task, job.method), []).append(final(summary, task_named(job.task).metric))

    def finals(self, setting: str, task: str, method: str) -> list[float]:
        return [v for v in self.values.get((setting, task, method), []) if v is not None]

    def dense(self, task: str) -> float | None:
        v = self.finals("current", task, "dense")
        return statistics.fmean(v) if v else None

    def gaps(self, setting: str, task: str, method: str) -> list[float]:
        d = self.dense(task)
        return [] if d is None else [gap(task_named(task), v, d) for v in self.finals(setting, task, method)]

    def mean_gap(self, setting: str, task: str, method: str) -> float | None:
        g = self.gaps(setting, task, method)
        return statistics.fmean(g) if g else None

    def collapses(self, setting: str, task: str, method: str) -> int:
        return sum(collapsed(task_named(task), v) for v in self.values.get((setting, task, method), []))

    def tasks(self) -> list[str]:
        return [t for t in TASKS if any(k[1] == t for k in self.values)]


def _pm(values: list[float], digits: int = 1) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} ± {std:.{digits}f}"


def _cell(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:+.{digits}f}"


def worst_and_mean(r: Results, setting: str, method: str, tasks: list[str]) -> tuple[float | None, float | None, str]:
    gaps = {t: r.mean_gap(setting, t, method) for t in tasks}
    gaps = {t: g for t, g in gaps.items() if g is not None}
    if not gaps:
        return None, None, ""
    worst = max(gaps, key=gaps.get)
    return gaps[worst], statistics.fmean(gaps.values()), worst


def gap_table(r: Results, setting: str, methods: list[str], tasks: list[str]) -> str:
    head = ["task", "dense", *methods]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in tasks:
        task = TASKS[t]
        unit = "bpc" if task.lower_is_better else "%"
        cells = [_cell(r.mean_gap(setting, t, m)) + ("!" * bool(r.collapses(setting, t, m))) for m in methods]
        lines.append(f"| {t} | {_pm(r.finals('current', t, 'dense'), 2 if task.lower_is_better else 1)} {unit} | " + " | ".join(cells) + " |")
    stats = [worst_and_mean(r, setting, m, tasks) for m in methods]
    lines.append("| **worst** | | " + " | ".join(f"**{_cell(w)}** ({t})" if w is not None else "-" for w, _, t in stats) + " |")
    lines.append("| **mean** | | " + " | ".join(_cell(mn) for _, mn, _ in stats) + " |")
    return "\n".join(lines) + "\n"


def plot(r: Results, setting: str, tasks: list[str], path: Path) -> None:
    """Gap to dense against forward sparsity, one colour per method: the mean over tasks
    (solid) and the worst task (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    colors = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"])
    for name in ("topkast", "rigl", "set", "gmp"):
        points = [(f, m) for m, (n, f) in METHODS.items() if n == name]
        stats = [(f, *worst_and_mean(r, setting, m, tasks)[:2]) for f, m in points]
        stats = [(f, w, mn) for f, w, mn in stats if w is not None]
        if not stats:
            continue
        color = next(colors)
        ax.plot([s[0] for s in stats], [s[2] for s in stats], "o-", color=color, label=f"{name}, mean over tasks")
        ax.plot([s[0] for s in stats], [s[1] for s in stats], "v--", color=color, alpha=0.7, label=f"{name}, worst task")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("forward sparsity")
    ax.set_ylabel("gap to dense (accuracy points; LM: % of bpc)")
    ax.set_title(f"Accuracy suite: {len(tasks)} tasks, gap to dense")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def targets(r: Results, tasks: list[str]) -> str:
    """The issue's targets, each met or missed, with the numbers."""
    lines = ["| target | worst task | measured | |", "|---|---|---|---|"]

    def versus(a: str, b: str, margin: float, label: str) -> None:
        diffs = {t: (r.mean_gap("current", t, b), r.mean_gap("current", t, a)) for t in tasks}
        diffs = {t: gb - ga for t, (gb, ga) in diffs.items() if gb is not None and ga is not None}
        if diffs:
            t = min(diffs, key=diffs.get)
            lines.append(f"| {label} | {t} | {diffs[t]:+.1f} | {'met' if diffs[t] >= -margin else 'missed'} |")

    versus("topkast90", "gmp90", 1.0, "Top-KAST 90/80 ≥ GMP 90% − 1.0 on every task")
    versus("topkast95", "gmp95", 2.5, "Top-KAST 95/90 ≥ GMP 95% − 2.5 on every task")
    for m in ("topkast90", "topkast95"):
        worst = None
        for t in tasks:
            now, old = r.gaps("current", t, m), r.gaps("former", t, m)
            if len(now) > 1 and len(old) > 1:
                # better is a smaller gap: the margin of `now` over `old` in units of the larger std
                spread = max(statistics.stdev(now), statistics.stdev(old), 1e-9)
                z = (statistics.fmean(old) - statistics.fmean(now)) / spread
                worst = min(worst or (z, t), (z, t))
        if worst:
            lines.append(f"| {m}: not worse than the former defaults by more than one std | {worst[1]} | "
                         f"{worst[0]:+.2f} std | {'met' if worst[0] >= -1 else 'missed'} |")
    for m in ("topkast95", "rigl95", "set95"):
        n = sum(r.collapses("current", t, m) for t in tasks)
        lines.append(f"| {m}: seeds at chance level | | {n} | {'met' if n == 0 else 'missed'} |")
    return "\n".join(lines) + "\n"


def checks_table(r: Results) -> str:
    lines = ["| run | method | defaults | final | worst seed | gap to dense | seeds at chance |", "|---|---|---|---|---|---|---|"]
    for name, methods in CHECK_METHODS.items():
        for m in methods:
            for setting in ("current", "former"):
                if not r.values.get((setting, name, m)) or (m == "dense" and setting != "current"):
                    continue
                label = "-" if m == "dense" else ("former (coupled, λ 0.005)" if setting == "former" else "current")
                values = r.finals(setting, name, m)
                lines.append(f"| {name} | {m} | {label} | {_pm(values)} | {min(values, default=float('nan')):.1f} | "
                             f"{'' if m == 'dense' else _cell(r.mean_gap(setting, name, m))} | {r.collapses(setting, name, m)} |")
    gaps = r.gaps("current", "default_task", "topkast90")
    if gaps:
        g = statistics.fmean(gaps)
        lines.append(f"\nTarget: the default task, Top-KAST 90/80 within 1.5 points of dense: {g:+.1f}, "
                     f"{'met' if g <= 1.5 else 'missed'}.")
    return "\n".join(lines) + "\n"


def report(r: Results, out: Path, seeds, quick: bool) -> Path:
    tasks = r.tasks()
    text = header("Accuracy suite" + (" (quick smoke run: numbers mean nothing)" if quick else ""))
    text += (f"`python -m bench suite`. Final held-out metric after the last step, seeds {', '.join(map(str, seeds))}, "
             "two runs at a time on one thread each. Every method with its defaults (`topkast_cli/conf/sparsity/`); "
             "the same data, model, optimizer and steps for every method of a task.\n\n## Tasks\n\n"
             "| task | family | setting |\n|---|---|---|\n")
    text += "".join(f"| {t} | {TASKS[t].family} | {TASKS[t].title} |\n" for t in tasks)
    skipped = [t for t in TASKS if t not in tasks]
    if skipped:
        text += f"\nNot run: {', '.join(skipped)} (its data is absent, or the run left it out).\n"
    text += ("\n## Gap to dense\n\nMean over seeds of dense (mean) − method, in accuracy points; for the language model "
             "100·(bpc − dense bpc)/dense bpc, in %. Positive: worse than dense. `!`: a seed at chance level. "
             "The worst case names its task.\n\n")
    text += gap_table(r, "current", list(METHODS)[1:], tasks)
    if any(k[0] == "former" for k in r.values):
        text += ("\nTop-KAST with the former defaults (coupled regulariser, λ = 0.005), same tasks and seeds:\n\n"
                 + gap_table(r, "former", ["topkast90", "topkast95"], tasks))
    text += "\n## Targets\n\n" + targets(r, tasks)
    text += ("\n## Full-length runs (not used to choose defaults)\n\n"
             + "".join(f"- `{name}`: {task.title}\n" for name, task in CHECKS.items())
             + "\nFinal held-out accuracy, mean ± std over the seeds; gap to dense in points.\n\n" + checks_table(r))
    text += "\n![gap to dense against sparsity](suite.png)\n\n## Every run (final metric, mean ± std over seeds)\n\n"
    text += "| task | method | setting | final |\n|---|---|---|---|\n"
    for (setting, t, m), _ in sorted(r.values.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        text += f"| {t} | {m} | {setting} | {_pm(r.finals(setting, t, m), 3 if task_named(t).lower_is_better else 1)} |\n"
    plot(r, "current", tasks, out / "suite.png")
    return write(out, "suite.md", text)


def settings_report(r: Results, out: Path, names: list[str], seeds) -> Path:
    """Candidate defaults ranked by their worst case over the suite, per method and sparsity."""
    tasks = r.tasks()
    text = header("Accuracy suite: candidate defaults")
    text += (f"`python -m bench.suite --settings {','.join(names)}`, seeds {', '.join(map(str, seeds))}. "
             "Gap to dense as in suite.md (accuracy points; LM: % of bpc), mean over seeds. Ranked by the worst "
             "task, then the mean; `!` marks a seed at chance level.\n\n")
    for m in [m for m in SPARSE if METHODS[m][0] in DYNAMIC and METHODS[m][1] >= 0.9]:
        rows = []
        for s in names:
            if METHODS[m][0] not in SETTINGS[s][0] or not any(r.finals(s, t, m) for t in tasks):
                continue
            worst, mean, at = worst_and_mean(r, s, m, tasks)
            n = sum(r.collapses(s, t, m) for t in tasks)
            rows.append((worst, mean, s, at, n))
        if not rows:
            continue
        text += f"### {m}\n\n| setting | worst | at | mean | collapsed seeds | " + " | ".join(tasks) + " |\n"
        text += "|" + "---|" * (5 + len(tasks)) + "\n"
        for worst, mean, s, at, n in sorted(rows, key=lambda x: (x[0], x[1])):
            cells = [_cell(r.mean_gap(s, t, m)) for t in tasks]
            text += f"| {s} | {_cell(worst)} | {at} | {_cell(mean)} | {n} | " + " | ".join(cells) + " |\n"
        text += "\n"
    text += "Settings:\n\n" + "".join(f"- `{s}`: {', '.join(SETTINGS[s][1]) or 'the defaults'} ({', '.join(SETTINGS[s][0])})\n" for s in names)
    return write(out, "suite_settings.md", text)


# ------------------------------------------------------------------ entry points
def main(out: Path = RESULTS, quick: bool = False, jobs: int = 2, runs: Path | None = None, seeds=SEEDS,
         tasks: list[str] | None = None) -> Path:
    """Every method with its defaults on every task (or `tasks`), plus Top-KAST's former defaults."""
    tasks = tasks or [t for t, task in TASKS.items() if task.available()]
    if quick:
        tasks, seeds = tasks[:2], (0,)
    root = runs or (out / "runs" / "suite" if quick else Path("runs") / "suite")
    grid = jobs_for(root, "current", (), tasks, list(METHODS) if not quick else ["dense", "topkast90", "gmp90"], seeds, quick)
    grid += jobs_for(root, "former", FORMER, tasks, ["topkast90", "topkast95"] if not quick else ["topkast90"], seeds, quick)
    for name, methods in CHECK_METHODS.items():
        grid += jobs_for(root, "current", (), [name], methods[: 2 if quick else None], seeds, quick)
        if quick:
            grid += jobs_for(root, "former", FORMER, [name], ["topkast90"], seeds, quick)
    return report(Results(run_all(grid, jobs)), out, seeds, quick)


def run_settings(names: list[str], out: Path, jobs: int, runs: Path, seeds, tasks: list[str], only: list[str],
                 run: bool = True) -> Path:
    grid = jobs_for(runs, "current", (), tasks, ["dense"], seeds, False)
    for s in names:
        applies, extra = SETTINGS[s]
        methods = [m for m in SPARSE if METHODS[m][0] in applies and METHODS[m][1] >= 0.9 and (not only or m in only)]
        grid += jobs_for(runs, s, extra, tasks, methods, seeds, False)
    return settings_report(Results(run_all(grid, jobs, run)), out, names, seeds)


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.suite", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: two tasks, a few steps")
    parser.add_argument("--settings", default="", help=f"candidate defaults to compare: {', '.join(SETTINGS)}")
    parser.add_argument("--tasks", default="", help="comma-separated task names (default: all)")
    parser.add_argument("--methods", default="", help="with --settings: comma-separated methods of METHODS (default: all at 90%% and 95%%)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--runs", type=Path, default=Path("runs") / "suite", help="where the runs go")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-run", action="store_true", help="with --settings: only tabulate the runs that exist")
    args = parser.parse_args(argv)
    seeds = tuple(int(s) for s in args.seeds.split(","))
    tasks = [t for t in args.tasks.split(",") if t] or [t for t, task in TASKS.items() if task.available()]
    names = [s for s in args.settings.split(",") if s]
    unknown = [n for n in names if n not in SETTINGS] + [t for t in tasks if t not in TASKS]
    if unknown:
        sys.exit(f"unknown settings or tasks: {', '.join(unknown)}; settings: {', '.join(SETTINGS)}; tasks: {', '.join(TASKS)}")
    if names:
        run_settings(names, args.out, args.jobs, args.runs, seeds, tasks, [m for m in args.methods.split(",") if m], not args.no_run)
    else:
        main(args.out, quick=args.quick, jobs=args.jobs, runs=None if args.quick else args.runs, seeds=seeds,
             tasks=[t for t in args.tasks.split(",") if t] or None)


if __name__ == "__main__":
    cli()
