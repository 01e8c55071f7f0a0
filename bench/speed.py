"""Training-step time of Top-KAST relative to dense, measured side by side in one process:
the runs are built by the trainer (`train.build`) and stepped by its `train_step`, in
interleaved rounds so that load on the machine falls on every setting alike."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from topkast_cli.config import compose, without_hydra
from topkast_cli.loop import train_step
from topkast_cli.run import build_run

from .common import header, write

# (model, overrides, rounds x steps per round)
MODELS = {
    "cnn1d, MNIST-1D (batch 100)": (["model=cnn1d", "dataset=mnist1d"], (15, 50)),
    "resnet18, 32x32 synthetic (batch 32)": (
        ["model=resnet18", "dataset=synthetic", "dataset.batch_size=32", "dataset.train_size=256"], (3, 4),
    ),
}
TOPKAST = ["sparsity=topkast", "sparsity.forward=0.9", "sparsity.exploration_steps=null"]
REFRESH_EVERY = (25, 100)  # the default, and the paper's
BETWEEN = "Top-KAST 90/80, between refreshes (B ≠ A)"
EVERY_STEP = "Top-KAST 90/80, refresh every step"
SETTINGS = {
    "dense": ["sparsity=dense"],
    BETWEEN: [*TOPKAST, "sparsity.refresh_interval=1000000000"],
    EVERY_STEP: [*TOPKAST, "sparsity.refresh_interval=1"],
    "Top-KAST 90, locked (B = A)": [*TOPKAST, "sparsity.exploration_steps=0"],
}


def make_run(overrides: list[str], where: Path, max_steps: int = 100_000, cached: int = 8):
    """A run built as `topkast train` builds it, `cached` of its first batches on its device,
    and the parameters the optimizer steps. (The long default max_steps keeps schedules flat
    while steps are timed.)"""
    cfg = without_hydra(compose("train", [*overrides, f"trainer.max_steps={max_steps}", "trainer.progress=false"]))
    run = build_run(cfg, where)
    run.model.train()
    batches = []
    for x, y in run.data.train_loader(0, cfg.seed, 0) if cached else ():
        batches.append((x.to(run.device), y.to(run.device)))
        if len(batches) == cached:
            break
    params = [p for g in run.optimizer.param_groups for p in g["params"]]
    return run, batches, params


def _sync(run):
    if run.device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(run, batches, params, n: int) -> float:
    """Seconds per step over n steps."""
    _sync(run)
    t0 = time.perf_counter()
    for i in range(n):
        x, y = batches[i % len(batches)]
        train_step(run, x, y, params)
    _sync(run)
    return (time.perf_counter() - t0) / n


def refresh_time(run, n: int = 5) -> float:
    """Seconds for one Top-KAST mask refresh of every layer (top-k of A and B, new masks)."""
    method = run.method
    _sync(run)
    t0 = time.perf_counter()
    for _ in range(n):
        method.after_step(method.schedule.every, run.optimizer)
    _sync(run)
    return (time.perf_counter() - t0) / n


def measure(overrides: list[str], rounds: int, steps: int, warmup: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        runs = {name: make_run([*overrides, *o], Path(tmp) / str(i)) for i, (name, o) in enumerate(SETTINGS.items())}
        for run, batches, params in runs.values():
            time_steps(run, batches, params, warmup)
        times = {name: [] for name in runs}
        for _ in range(rounds):  # interleaved: drift in machine load hits all settings
            for name, (run, batches, params) in runs.items():
                times[name].append(time_steps(run, batches, params, steps))
        refresh = refresh_time(runs[EVERY_STEP][0])
    per_step = {name: statistics.median(t) for name, t in times.items()}
    # Refresh every n steps: n - 1 steps between refreshes and one with a refresh.
    for n in REFRESH_EVERY:
        per_step[f"Top-KAST 90/80, refresh every {n} steps"] = per_step[BETWEEN] + refresh / n
    return {"per_step": per_step, "refresh": refresh}


def main(out: Path, quick: bool = False) -> Path:
    lines = [header("Speed: Top-KAST step time relative to dense")]
    lines.append(
        "Each setting is a run built by the trainer and stepped by its own `train_step` (hooks, "
        "Adam, fp32) on the same cached batches, in interleaved rounds; the figure is the median "
        "round. `refresh every n steps` = a step between refreshes + one refresh / n (both "
        "measured); `one mask refresh` is the top-k of A and B in every layer.\n"
    )
    for model, (overrides, (rounds, steps)) in MODELS.items():
        rounds, steps, warmup = (1, 2, 1) if quick else (rounds, steps, 3)
        print(f"speed: {model}", flush=True)
        r = measure(overrides, rounds, steps, warmup)
        dense = r["per_step"]["dense"]
        lines.append(
            f"\n## {model}\n\n{rounds} rounds x {steps} steps, {warmup} warm-up steps.\n\n"
            "| setting | ms / step | relative to dense |\n|---|---|---|"
        )
        for name, t in r["per_step"].items():
            lines.append(f"| {name} | {t * 1e3:.2f} | {t / dense:.3f} |")
        lines.append(f"| one mask refresh (all layers) | {r['refresh'] * 1e3:.2f} | {r['refresh'] / dense:.3f} |")
    return write(out, "speed.md", "\n".join(lines) + "\n")
