"""The accuracy cost of blocks: Top-KAST 90/80 unstructured against 4x4 and 16x16 blocks
(`sparsity.block`), on the default task and on the accuracy suite's tasks, 3 seeds, beside
the step time each block size buys on the sparse backend.

    python -m bench blocks                      # every task, 3 seeds (about 20 min on 2 cores)
    python -m bench.blocks --tasks digits_mlp --seeds 0

Runs are the suite's (`bench.suite`: one `topkast train` job each, in a pool of one-thread
workers, a finished run of the same config is not run again). In every setting, the dense
run included, the layers no block size divides (the 10-way classifiers) stay dense (the LM's
output layer is dense already), so the settings differ only in the mask's shape.
The default task runs at 32 channels (25 has no 4-row blocks); its own dense run is beside it.

The step time is the whole training step of the wide MLP (1024-4096-4096-10, batch 256) on
the sparse backend at 90/80 (`bench.backends`' harness), as a ratio to dense in the same
process: what a user who picks a block size buys in speed for the accuracy it costs.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from . import suite
from .common import RESULTS, header, write

DEFAULT_TASK = "default_task_c32"
suite.CHECKS[DEFAULT_TASK] = suite.Task(
    "`topkast train` as it comes at 32 channels: MNIST-1D, cnn1d 32 channels, strides 2-1-1, Adam 1e-2, 6000 steps",
    "1-D CNN", ("model=cnn1d", "model.channels=32", "dataset=mnist1d"), ("trainer.max_steps=8", "model.channels=8"))
# The layers each task keeps dense in every setting: those no block size divides.
DENSE = {DEFAULT_TASK: "classifier", "mnist1d_cnn": "classifier", "mnist1d_cnn_wide_s2": "classifier",
         "mnist1d_mlp_sgd": "net.5", "digits_mlp": "net.5", "digits_cnn_bn": "classifier", "digits_wrn_sgd": "fc",
         "shakespeare_lm": None}  # (the LM's output layer is dense already)
# The default model's 25 channels have no 4-row blocks: it runs as DEFAULT_TASK instead.
TASKS = [DEFAULT_TASK, *(t for t in suite.TASKS if t != "mnist1d_cnn")]
BLOCKS = {"unstructured": 1, "4x4": 4, "16x16": 16}
METHOD = "topkast90"


def settings(task: str) -> dict[str, tuple[str, ...]]:
    keep = (f"sparsity.dense_layers=[{DENSE[task]}]",) if DENSE[task] else ()
    return {name: (*keep, f"sparsity.block=[{b},{b}]") for name, b in BLOCKS.items()}


def jobs(root: Path, tasks: list[str], seeds, quick: bool) -> list[suite.Job]:
    grid = []
    for t in tasks:
        grid += suite.jobs_for(root, "current", (), [t], ["dense"], seeds, quick)
        for name, extra in settings(t).items():
            grid += suite.jobs_for(root, name, extra, [t], [METHOD], seeds, quick)
    return grid


def step_times(quick: bool) -> dict[str, float | None]:
    """Whole training step of the wide MLP at 90/80 on the sparse backend, per block size, as a
    ratio to dense (None: refused)."""
    from . import backends

    overrides, (rounds, steps), small, extra = backends.MODELS[backends.WIDE]
    overrides = [*overrides, *small] if quick else overrides
    plain = backends.settings(0.9, 0.8, extra)
    named = {"dense": plain["dense"]}
    for name, b in BLOCKS.items():
        named[name] = [*plain["sparse"], f"sparsity.block=[{b},{b}]", *([] if b == 1 else backends.BLOCK_EXTRA)]
    r = backends.measure(overrides, named, *((1, 2) if quick else (rounds, steps)), quick)
    dense = r["found"]["dense"]["step"]
    return {name: (r["found"][name]["step"] / dense if name in r["found"] else None) for name in BLOCKS}


def table(r: suite.Results, tasks: list[str]) -> str:
    head = ["task", "dense", *(f"{n}" for n in BLOCKS), *(f"{n} − unstructured" for n in BLOCKS if n != "unstructured")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in tasks:
        task = suite.task_named(t)
        digits = 3 if task.lower_is_better else 1
        cells = [suite._pm(r.finals("current", t, "dense"), digits)]
        cells += [suite._pm(r.finals(name, t, METHOD), digits) if r.finals(name, t, METHOD) or not r.values.get((name, t, METHOD))
                  else "refused" for name in BLOCKS]
        base = r.mean_gap("unstructured", t, METHOD)
        for name in BLOCKS:
            if name != "unstructured":
                g = r.mean_gap(name, t, METHOD)
                cells.append("-" if g is None or base is None else f"{g - base:+.1f}")
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def mean_cost(r: suite.Results, tasks: list[str], name: str) -> float | None:
    """Mean over tasks of the extra gap to dense that `name` costs over unstructured."""
    costs = [(g - b) for t in tasks
             if (g := r.mean_gap(name, t, METHOD)) is not None and (b := r.mean_gap("unstructured", t, METHOD)) is not None]
    return statistics.fmean(costs) if costs else None


def plot(r: suite.Results, tasks: list[str], times: dict[str, float | None], path: Path) -> None:
    """Gap to dense (mean over tasks and the worst task) against the step-time ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for name in BLOCKS:
        worst, mean, _ = suite.worst_and_mean(r, name, METHOD, tasks)
        if times.get(name) is None or mean is None:
            continue
        ax.plot(times[name], mean, "o", color="C0")
        ax.plot(times[name], worst, "v", color="C3")
        ax.annotate(name, (times[name], mean), textcoords="offset points", xytext=(6, 4))
    ax.plot([], [], "o", color="C0", label="mean over tasks")
    ax.plot([], [], "v", color="C3", label="worst task")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("step time / dense (wide MLP, 90/80, sparse backend)")
    ax.set_ylabel("gap to dense (accuracy points; LM: % of bpc)")
    ax.set_title("Top-KAST 90/80: block size, accuracy and speed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def report(r: suite.Results, tasks: list[str], times: dict[str, float | None], out: Path, seeds, quick: bool) -> Path:
    text = header("Blocks: the accuracy cost of structure" + (" (quick smoke run: numbers mean nothing)" if quick else ""))
    text += __doc__.split("\n\n", 2)[2].strip() + "\n\n"
    text += f"Seeds {', '.join(map(str, seeds))}. Tasks:\n\n" + "".join(
        f"- `{t}`: {suite.task_named(t).title}" + (f" (dense in every setting: `{DENSE[t]}`)" if DENSE[t] else "") + "\n"
        for t in tasks)
    text += ("\n`refused`: the run stops at the start with one line, e.g. WRN-10-1's 1x1 shortcut (32x16, two 16x16 "
             "blocks) would keep no block at 90%.\n")
    text += ("\n## Final held-out metric\n\nAccuracy in % (the LM: bpc), mean ± std over seeds; the last columns: the "
             "extra gap to dense that blocks cost over unstructured Top-KAST, in accuracy points (LM: % of bpc; "
             "positive: worse).\n\n" + table(r, tasks))
    text += "\n## Trade-off\n\n| setting | step / dense | mean extra gap over unstructured | worst task's gap to dense |\n|---|---|---|---|\n"
    for name in BLOCKS:
        worst, _, at = suite.worst_and_mean(r, name, METHOD, tasks)
        cost = mean_cost(r, tasks, name)
        text += (f"| {name} | {'-' if times.get(name) is None else f'{times[name]:.2f}'} | "
                 f"{'-' if cost is None else f'{cost:+.1f}'} | {suite._cell(worst)} ({at}) |\n")
    g = r.mean_gap("4x4", DEFAULT_TASK, METHOD), r.mean_gap("unstructured", DEFAULT_TASK, METHOD)
    if None not in g:
        text += (f"\nAim: 4x4 blocks within 1.5 points of unstructured on the default task: {g[0] - g[1]:+.1f}, "
                 f"{'met' if g[0] - g[1] <= 1.5 else 'missed'}.\n")
    text += "\n![gap to dense against step time](blocks.png)\n"
    out.mkdir(parents=True, exist_ok=True)
    plot(r, tasks, times, out / "blocks.png")
    return write(out, "blocks.md", text)


def main(out: Path = RESULTS, quick: bool = False, jobs_at_once: int = 2, runs: Path | None = None, seeds=suite.SEEDS,
         tasks: list[str] | None = None, timing: bool = True, run: bool = True) -> Path:
    tasks = tasks or [t for t in TASKS if suite.task_named(t).available()]
    if quick:
        tasks, seeds = tasks[:2], (0,)
    root = runs or (out / "runs" / "blocks" if quick else Path("runs") / "blocks")
    r = suite.Results(suite.run_all(jobs(root, tasks, seeds, quick), jobs_at_once, run))
    times = step_times(quick) if timing else {}
    return report(r, tasks, times, out, seeds, quick)


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.blocks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: two tasks, a few steps")
    parser.add_argument("--tasks", default="", help=f"comma-separated, of: {', '.join(TASKS)}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--runs", type=Path, default=Path("runs") / "blocks", help="where the runs go")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-timing", action="store_true", help="leave out the step-time measurement")
    parser.add_argument("--no-run", action="store_true", help="only tabulate the runs that exist")
    args = parser.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t] or None
    unknown = [t for t in tasks or [] if t not in TASKS]
    if unknown:
        parser.error(f"unknown tasks: {', '.join(unknown)}; tasks: {', '.join(TASKS)}")
    main(args.out, args.quick, args.jobs, None if args.quick else args.runs, tuple(int(s) for s in args.seeds.split(",")),
         tasks, not args.no_timing, not args.no_run)


if __name__ == "__main__":
    cli()
