"""Accuracy vs sparsity of every method under the same trainer, data, step budget and
optimizer: each task is two `topkast sweep`s (the methods x sparsities x seeds grid, and
the dense baseline), run in parallel by Hydra's joblib launcher, then one table and plot."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from topkast_cli import sweep_summary as sweep

from .common import header, write

METHODS = "static,set,rigl,gmp,topkast"
SPARSITIES = "0.8,0.9,0.95"
SEEDS = "0,1,2"
# name: (title, overrides); every method keeps its own defaults (Top-KAST: backward density
# 2x forward, masks locked after 80% of the run; RigL/SET: updates every 100 steps until 75%;
# GMP: prunes from 10% to 75% of the run) and its own regulariser (Top-KAST, RigL, SET:
# decoupled, λ = 0.05; static, GMP: coupled L2, λ = 0.005).
TASKS = {
    "mnist1d": ("MNIST-1D, 1-D CNN (cnn1d, 64 channels), Adam lr 1e-2, 1500 steps",
                ["model=cnn1d", "model.channels=64", "dataset=mnist1d", "trainer.max_steps=1500"]),
    "digits": ("scikit-learn digits, MLP 64-256-256-10, Adam lr 1e-3, 800 steps",
               ["model=mlp", "dataset=digits", "optimizer.lr=0.001", "trainer.max_steps=800"]),
}
COMMON = ["trainer.threads=1", "trainer.progress=false", "trainer.tensorboard=false",
          "trainer.eval_every=null", "trainer.checkpoint_every=null"]


def topkast_sweep(args: list[str], sweep_dir: Path, jobs: int) -> None:
    launcher = ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={jobs}"] if jobs > 1 else []
    cmd = [sys.executable, "-m", "topkast_cli", "sweep", *args, *COMMON, *launcher, f"hydra.sweep.dir={sweep_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode not in (0, 1):  # 1: some job failed; it is a row of the table
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-2000:]}")


def pivot(rows: list[dict], digits: int = 1) -> str:
    """Final metric, mean ± std over seeds: one row per method, one column per sparsity."""
    done = [r for r in rows if r["status"] == "completed" and r.get("final") is not None]
    sparsities = sorted({r["forward_sparsity"] for r in done if r["method"] != "dense"})
    methods = ["dense"] + sorted({r["method"] for r in done} - {"dense"})
    head = ["method", *(f"{s:g}" for s in sparsities)]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for m in methods:
        cells = []
        for s in sparsities:
            values = [r["final"] for r in done if r["method"] == m and (m == "dense" or r["forward_sparsity"] == s)]
            if not values:
                cells.append("-")
            else:
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                cells.append(f"{statistics.fmean(values):.{digits}f} ± {std:.{digits}f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(out: Path, quick: bool = False, jobs: int = 2) -> list[Path]:
    # The runs themselves (checkpoints, logs) stay out of the results.
    runs_dir = out / "runs" if quick else Path("runs") / "bench" / time.strftime("%Y-%m-%d_%H-%M-%S")
    methods, sparsities, seeds = ("static,topkast", "0.9", "0") if quick else (METHODS, SPARSITIES, SEEDS)
    written = []
    for name, (title, overrides) in TASKS.items():
        if quick:
            overrides = [*overrides, "trainer.max_steps=10", "model.hidden=[16]" if "model=mlp" in overrides else "model.channels=8"]
        print(f"accuracy: {title}", flush=True)
        grid, dense = runs_dir / name / "methods", runs_dir / name / "dense"
        topkast_sweep([*overrides, f"sparsity={methods}", f"sparsity.forward={sparsities}", f"seed={seeds}"], grid, jobs)
        topkast_sweep([*overrides, "sparsity.forward=0", f"seed={seeds}"], dense, jobs)
        written.append(report(name, title, [grid, dense], out, seeds))
    return written


def report(name: str, title: str, sweep_dirs: list[Path], out: Path, seeds: str) -> Path:
    """The table (markdown, CSV) and plot of one task from its sweep directories."""
    rows = [row for d in sweep_dirs for row in sweep.collect(d)]
    text = header(f"Accuracy vs sparsity: {title}")
    text += (
        f"Final held-out accuracy (%), mean ± std over seeds {seeds}; every method with its defaults "
        "(see `topkast_cli/conf/sparsity/`), the same data, budget and optimizer. Plot: "
        f"[accuracy_{name}.png](accuracy_{name}.png).\n\n" + pivot(rows) + "\nEvery run:\n\n" + sweep.markdown(rows)
    )
    path = write(out, f"accuracy_{name}.md", text)
    sweep.write_csv(rows, out / f"accuracy_{name}.csv")
    sweep.plot(rows, out / f"accuracy_{name}.png")
    return path
