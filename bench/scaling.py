"""Data-parallel scaling on this machine: training steps per second of 1 process against 2
(`trainer.devices=2`, gloo), for the same job and the same global batch.

Each setting runs the console script twice, for a short and a long run, and the speed is the
difference of steps over the difference of wall time, so start-up (imports, data, the
process group) cancels out. 1 process gets every core as threads; 2 processes get half each.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from topkast_cli.spawn import cpu_count

from .common import header, write

# name: (overrides, short and long run in steps)
TASKS = {
    "default task: cnn1d on MNIST-1D, global batch 100": (["model=cnn1d", "dataset=mnist1d"], (50, 1050)),
    "larger: MLP 3072-1024-1024-10 on 32x32x3 synthetic, global batch 256": (
        ["model=mlp", "model.hidden=[1024,1024]", "dataset=synthetic", "dataset.batch_size=256",
         "dataset.train_size=4096"], (20, 220),
    ),
}
COMMON = ["trainer.eval_every=null", "trainer.checkpoint_every=null", "trainer.progress=false",
          "trainer.tensorboard=false"]
METHODS = {"dense": ["sparsity=dense"], "Top-KAST 90/80": ["sparsity=topkast", "sparsity.forward=0.9", "sparsity.exploration_steps=null"]}


def wall_time(args: list[str], devices: int, steps: int, where: Path) -> float:
    run_dir = where / f"run{len(list(where.iterdir()))}"
    threads = max(1, cpu_count() // devices)
    cmd = [sys.executable, "-m", "topkast_cli", "train", *args, *COMMON, f"trainer.max_steps={steps}",
           f"trainer.devices={devices}", f"trainer.threads={threads}", f"hydra.run.dir={run_dir}"]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return json.loads((run_dir / "summary.json").read_text())["wall_time_s"]


def steps_per_sec(args: list[str], devices: int, lengths: tuple[int, int], where: Path) -> float:
    short, long = lengths
    return (long - short) / (wall_time(args, devices, long, where) - wall_time(args, devices, short, where))


def main(out: Path, quick: bool = False) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for task, (args, lengths) in TASKS.items():
            if quick:
                lengths = (lengths[0], lengths[0] + (lengths[1] - lengths[0]) // 5)
            for method, extra in METHODS.items():
                one = steps_per_sec([*args, *extra], 1, lengths, Path(tmp))
                two = steps_per_sec([*args, *extra], 2, lengths, Path(tmp))
                rows.append((task, method, one, two))
                print(f"{task} / {method}: {one:.1f} -> {two:.1f} steps/s")
    lines = [
        "| task | method | 1 process (steps/s) | 2 processes (steps/s) | speed-up | scaling efficiency |",
        "|---|---|---|---|---|---|",
    ]
    for task, method, one, two in rows:
        lines.append(f"| {task} | {method} | {one:.1f} | {two:.1f} | {two / one:.2f}x | {two / one / 2:.0%} |")
    text = header("Data-parallel scaling: 1 vs 2 processes (gloo, CPU)") + (
        f"Steps per second of the same job and global batch in 1 process ({cpu_count()} threads) and in 2 processes "
        f"(`trainer.devices=2`, {max(1, cpu_count() // 2)} thread each), from the console script; start-up cancels out "
        "(two run lengths). Efficiency = speed-up / 2. On {n} CPU cores the two processes share the cores the single "
        "process used as threads, and every step adds a gradient all-reduce through gloo: this measures the cost "
        "of the data-parallel machinery, not what more machines would give.\n\n".replace("{n}", str(cpu_count()))
        + "\n".join(lines) + "\n"
    )
    write(out, "scaling.md", text)
