"""Character language model on Tiny Shakespeare (`../shared/data/tinyshakespeare.txt`, offline):
val bpc of dense, Top-KAST 80/60 and 90/80, RigL and static at 80% and 90%, over 3 seeds at
equal steps (one `topkast sweep` per method, two jobs in parallel), then the step time of each
setting against dense for every compute backend the sparsity configs offer."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from topkast_cli import sweep_summary as sweep

from . import speed
from .accuracy import pivot, topkast_sweep
from .common import header, write

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
STEPS = 300  # fits the whole bench in about 20 minutes on 2 cores (fewer steps, not fewer settings)
SEEDS = "0,1,2"
TITLE = f"Tiny Shakespeare, character Transformer (4 layers, width 128, 0.82M weights), {STEPS} steps"
# 4 layers x width 128, context 128, batch 16, Adam 2e-3 with 5% warm-up and cosine decay, clip 1.
MODEL = ["model=transformer", "dataset=textfile", "dataset.context=128", "dataset.batch_size=16",
         "optimizer=adam", "optimizer.lr=0.002", "scheduler=cosine", "scheduler.warmup=0.05", "trainer.grad_clip=1.0"]
# name: overrides of one sweep. Forward sparsity 0 is the dense baseline (no layer is attached).
# Top-KAST's backward density is 2x the forward one (80/60, 90/80); RigL updates every 25 steps
# like Top-KAST's refresh (its default 100 would give 2 updates in 300 steps).
# The regulariser as these figures were measured with (coupled L2, λ = 0.005): the decoupled
# default (λ = 0.05) was not measured on this bench.
COUPLED = ["sparsity.regularization_form=coupled", "sparsity.regularization=0.005", "sparsity.regularization_schedule=constant"]
SWEEPS = {
    "topkast": ["sparsity=topkast", "sparsity.forward=0,0.8,0.9", *COUPLED],
    "rigl": ["sparsity=rigl", "sparsity.forward=0.8,0.9", "sparsity.update_interval=25", *COUPLED],
    "static": ["sparsity=static", "sparsity.forward=0.8,0.9"],
}
TARGETS = ((0.8, 0.05), (0.9, 0.15))  # Top-KAST within this many bpc of dense


def step_times(overrides: list[str], rounds: int, steps: int) -> dict[str, float]:
    """Median seconds per training step of each setting, measured in interleaved rounds."""
    settings = {"dense": ["sparsity=dense"]}
    for backend in ("masked", "sparse"):
        extra = [f"sparsity.backend={backend}"] if backend != "masked" else []
        settings[f"Top-KAST 80/60, {backend}"] = ["sparsity=topkast", "sparsity.forward=0.8", *extra]
        settings[f"Top-KAST 90/80, {backend}"] = ["sparsity=topkast", "sparsity.forward=0.9", *extra]
    settings["RigL 90%"] = ["sparsity=rigl", "sparsity.forward=0.9", "sparsity.update_interval=25"]
    settings["static 90%"] = ["sparsity=static", "sparsity.forward=0.9"]
    with tempfile.TemporaryDirectory() as tmp:
        runs = {n: speed.make_run([*overrides, *o], Path(tmp) / str(i)) for i, (n, o) in enumerate(settings.items())}
        for run, batches, params in runs.values():
            speed.time_steps(run, batches, params, 2)
        times = {n: [] for n in runs}
        for _ in range(rounds):
            for n, (run, batches, params) in runs.items():
                times[n].append(speed.time_steps(run, batches, params, steps))
    return {n: statistics.median(t) for n, t in times.items()}


def targets(rows: list[dict]) -> list[str]:
    done = [r for r in rows if r["status"] == "completed" and r.get("final") is not None]

    def mean(method, forward=None):
        values = [r["final"] for r in done if r["method"] == method and (forward is None or r["forward_sparsity"] == forward)]
        return statistics.fmean(values) if values else None

    dense, lines = mean("dense"), []
    for forward, within in TARGETS:
        tk = mean("topkast", forward)
        if dense is None or tk is None:
            continue
        gap = tk - dense
        lines.append(f"- Top-KAST {forward:g}: {tk:.3f} bpc, {gap:+.3f} against dense ({dense:.3f}); "
                     f"target within {within}: {'met' if gap <= within else 'missed'}")
    tk90, others = mean("topkast", 0.9), {m: mean(m, 0.9) for m in ("rigl", "static")}
    if tk90 is not None and all(v is not None for v in others.values()):
        ahead = all(tk90 < v for v in others.values())
        lines.append(f"- Top-KAST 0.9 ahead of RigL ({others['rigl']:.3f}) and static ({others['static']:.3f}) "
                     f"at 90%: {'met' if ahead else 'missed'}")
    return lines


def main(out: Path, quick: bool = False, jobs: int = 2) -> list[Path]:
    if not SHAKESPEARE.is_file():
        print(f"lm: skipped, {SHAKESPEARE} is absent (the bench reads ../shared/data from the repository)")
        return []
    runs_dir = out / "runs" / "lm" if quick else Path("runs") / "bench" / time.strftime("%Y-%m-%d_%H-%M-%S") / "lm"
    model = [*MODEL, f"dataset.path={SHAKESPEARE}", f"trainer.max_steps={STEPS}"]
    sweeps, seeds, title = SWEEPS, SEEDS, TITLE
    if quick:  # a smoke run: tiny model, few steps, one seed, two settings
        model += ["trainer.max_steps=6", "model.layers=1", "model.width=32", "dataset.context=32"]
        sweeps = {"topkast": ["sparsity=topkast", "sparsity.forward=0,0.9"]}
        seeds, title = "0", "quick smoke run (numbers mean nothing)"
    print(f"lm: {title}", flush=True)
    dirs = []
    for name, overrides in sweeps.items():
        dirs.append(runs_dir / name)
        topkast_sweep([*model, *overrides, f"seed={seeds}"], dirs[-1], jobs)
    rows = [row for d in dirs for row in sweep.collect(d)]
    rounds, steps = (1, 2) if quick else (3, 10)
    times = step_times([*model, "trainer.threads=2"], rounds, steps)

    text = header(f"Language model: {title}")
    text += (
        f"Final val bits per character (the whole val split, the last 10% of the file, in non-overlapping "
        f"windows of the context), mean ± std over seeds {seeds}; all runs take the same steps and, per seed, "
        "see the same windows. Top-KAST: backward density 2x forward (80/60, 90/80), refresh every 25 "
        "steps, masks locked after 80% of the run; RigL: update every 25 steps until 75%; static: a random "
        f"mask. Plot: [lm_tinyshakespeare.png](lm_tinyshakespeare.png).\n\n"
        + pivot(rows, digits=3)
        + "\nTargets (equal steps):\n\n" + "\n".join(targets(rows) or ["- (not enough runs)"]) + "\n"
        + f"\n## Step time against dense\n\n{rounds} interleaved rounds x {steps} steps, 2 threads, "
        "the same cached batches; median round.\n\n| setting | ms / step | relative to dense |\n|---|---|---|\n"
        + "".join(f"| {n} | {t * 1e3:.1f} | {t / times['dense']:.3f} |\n" for n, t in times.items())
        + "\nEvery run:\n\n" + sweep.markdown(rows)
    )
    path = write(out, "lm_tinyshakespeare.md", text)
    sweep.write_csv(rows, out / "lm_tinyshakespeare.csv")
    sweep.plot(rows, out / "lm_tinyshakespeare.png")
    return [path]
