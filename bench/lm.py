"""Character language model on Tiny Shakespeare (`../shared/data/tinyshakespeare.txt`, offline):
val bpc over the run of dense, Top-KAST 80/60 and 90/80, RigL and static at 80% and 90%, and
bigger-but-sparser Top-KAST (wider models with about the dense model's non-zero weights), over
3 seeds at equal steps; then the step time of each setting against dense per compute backend.

    python -m bench lm                                      # every row, 3 seeds, step times
    python -m bench.lm --rows dense,topkast80 --seeds 0     # a batch of rows
    python -m bench.lm --no-run --step-times                # the table of every run so far, step times measured
    python -m bench.lm --quick                              # a smoke run (numbers mean nothing)

Each run is one `topkast train` job run in-process by a pool of workers (`bench.suite`'s
machinery), in `--runs DIR/ROW/seedN`. A finished run of the same composed config is not
run again, and the table is rebuilt from every finished run under `--runs`: rows can be run
in several batches, also in parallel processes (on different rows or seeds), and tabulated
together (delete `--runs` after changing the code).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from topkast_cli.run_logs import read_jsonl

from . import speed
from .common import RESULTS, header, machine, write
from .suite import Job, run_all

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
STEPS = 2000
EVAL_EVERY = 200  # val bpc every 200 steps: the curves of the plot
SEEDS = (0, 1, 2)
# The bench runs the tool's LM defaults: optimizer, learning rate, schedule, clipping, batch
# and context are what `model=transformer dataset=textfile` composes (shown in the report),
# so the bench measures what a user gets. Only the data file, the steps and the rows' model
# width and sparsity are set here.
MODEL = ("model=transformer", "dataset=textfile", f"dataset.path={SHAKESPEARE}", f"trainer.max_steps={STEPS}")
COMMON = ("trainer.threads=1", "trainer.progress=false", "trainer.tensorboard=false", f"trainer.eval_every={EVAL_EVERY}",
          "trainer.checkpoint_every=null", "trainer.log_every=100", "trainer.collapse_window=null")
QUICK = ("trainer.max_steps=20", "trainer.eval_every=10", "model.layers=1", "dataset.context=32", "dataset.val_fraction=0.01")


@dataclass(frozen=True)
class Row:
    label: str
    sparsity: tuple[str, ...]
    width: int = 128
    heads: int = 4  # head width 32 throughout

    def overrides(self, quick: bool) -> list[str]:
        width, heads = (self.width // 8, max(1, self.heads // 4)) if quick else (self.width, self.heads)
        return [*MODEL, *self.sparsity, f"model.width={width}", f"model.heads={heads}", *COMMON, *(QUICK if quick else ())]


def _topkast(forward: float, backward: float) -> tuple[str, ...]:
    return ("sparsity=topkast", f"sparsity.forward={forward}", f"sparsity.backward={backward}")


# Each method with its own defaults (conf/sparsity/) apart from the sparsities. The wide rows
# are sized so that their non-zero weights are at most the dense width-128 model's (0.81M):
# 4 layers hold 12·width² weights each, 20% of that at width 272 and 10% at width 384 is
# about the 0.79M of dense width 128; the embeddings stay dense. Dense width 64 has about
# the non-zeros of Top-KAST 80/60 at width 128: the small dense model of the same cost.
ROWS: dict[str, Row] = {
    "dense": Row("dense", ("sparsity=dense",)),
    "topkast80": Row("Top-KAST 80/60", _topkast(0.8, 0.6)),
    "topkast90": Row("Top-KAST 90/80", _topkast(0.9, 0.8)),
    "rigl80": Row("RigL 80%", ("sparsity=rigl", "sparsity.forward=0.8")),
    "rigl90": Row("RigL 90%", ("sparsity=rigl", "sparsity.forward=0.9")),
    "static80": Row("static 80%", ("sparsity=static", "sparsity.forward=0.8")),
    "static90": Row("static 90%", ("sparsity=static", "sparsity.forward=0.9")),
    "topkast80_w272": Row("Top-KAST 80/60, width 272", _topkast(0.8, 0.6), 272, 8),
    "topkast90_w384": Row("Top-KAST 90/80, width 384", _topkast(0.9, 0.8), 384, 12),
    "dense_w64": Row("dense, width 64", ("sparsity=dense",), 64, 2),
    # the option that won the accuracy suite's LM (suite_settings.md): per-layer lr x 1/density
    "topkast80_lr": Row("Top-KAST 80/60, lr_scale=density", (*_topkast(0.8, 0.6), "sparsity.lr_scale=density")),
    "topkast90_lr": Row("Top-KAST 90/80, lr_scale=density", (*_topkast(0.9, 0.8), "sparsity.lr_scale=density")),
}
QUICK_ROWS = ("dense", "topkast80", "topkast80_w272")


# ------------------------------------------------------------------ the runs
def jobs_for(root: Path, rows: list[str], seeds, quick: bool) -> list[Job]:
    return [Job("lm", "shakespeare", name, seed, (*ROWS[name].overrides(quick), f"seed={seed}"), root / name / f"seed{seed}")
            for name in rows for seed in seeds]


@dataclass
class Stats:
    """One row over the seeds found: final val bpc, curve (mean per eval step), sizes, time."""
    finals: list[float]
    failed: int
    nonzero: int | None
    params: int | None
    wall: float | None
    curve: dict[int, float]

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.finals) if self.finals else None

    @property
    def sd(self) -> float:
        return statistics.stdev(self.finals) if len(self.finals) > 1 else 0.0


def collect(root: Path, rows=ROWS) -> dict[str, Stats]:
    """Every finished run under `root` (whichever invocation made it), by row."""
    out = {}
    for name in rows:
        finals, failed, sizes, walls, curves = [], 0, [], [], []
        for run_dir in sorted((root / name).glob("seed*")):
            path = run_dir / "summary.json"
            summary = json.loads(path.read_text()) if path.is_file() else {}
            if summary.get("status") == "failed":
                failed += 1
            if summary.get("status") != "completed":  # (running, interrupted, or never started)
                continue
            metric = summary.get("metric", "bpc")
            value = (summary.get("final") or {}).get(metric)
            if value is None or not math.isfinite(value):
                failed += 1
                continue
            finals.append(float(value))
            sizes.append((summary["density"]["nonzero"], summary["density"]["params"]))
            walls.append(summary["wall_time_s"])
            log = run_dir / "metrics.jsonl"
            curves.append({r["step"]: r[metric] for r in (read_jsonl(log) if log.is_file() else []) if r.get("split") == "val"})
        if finals or failed:
            # the mean curve over the steps every seed reached
            steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
            out[name] = Stats(finals, failed, *(sizes[0] if sizes else (None, None)),
                              statistics.fmean(walls) if walls else None,
                              {s: statistics.fmean(c[s] for c in curves) for s in steps})
    return out


def unfinished(root: Path, rows=ROWS) -> dict[str, dict[int, float]]:
    """The val curves of runs without a finished summary, by "row, seed N"."""
    out = {}
    for name in rows:
        for run_dir in sorted((root / name).glob("seed*")):
            summary = run_dir / "summary.json"
            if summary.is_file() and json.loads(summary.read_text()).get("status") == "completed":
                continue
            log = run_dir / "metrics.jsonl"
            curve = {r["step"]: r["bpc"] for r in (read_jsonl(log) if log.is_file() else []) if r.get("split") == "val"}
            if curve:
                out[f"{ROWS[name].label}, {run_dir.name.replace('seed', 'seed ')}"] = curve
    return out


# ------------------------------------------------------------------ targets
def targets(stats: dict[str, Stats]) -> list[tuple[str, str, str]]:
    """The issue's targets as (target, measured, met | missed | not run)."""
    lines = []

    def check(label: str, names: tuple[str, ...], measure) -> None:
        missing = [ROWS[n].label for n in names if n not in stats or stats[n].mean is None]
        if missing:
            lines.append((label, f"no finished run of {', '.join(missing)}", "not run"))
        else:
            text, ok = measure(*(stats[n] for n in names))
            lines.append((label, text, "met" if ok else "missed"))

    def n(s: Stats) -> str:
        return f" (n = {len(s.finals)})" if len(s.finals) != len(SEEDS) else ""

    check(f"dense with the tool's LM defaults, {STEPS} steps: ≤ 2.40 bpc", ("dense",),
          lambda d: (f"{d.mean:.3f}{n(d)}", d.mean <= 2.40))
    for name, limit in (("topkast80", 0.10), ("topkast90", 0.20)):
        check(f"{ROWS[name].label} − dense ≤ {limit:+.2f}", (name, "dense"),
              lambda t, d, limit=limit: (f"{t.mean:.3f}{n(t)} − {d.mean:.3f}{n(d)} = {t.mean - d.mean:+.3f}",
                                         t.mean - d.mean <= limit))
    for s in (80, 90):
        check(f"Top-KAST {s}% ahead of RigL and static by ≥ 0.03", (f"topkast{s}", f"rigl{s}", f"static{s}"),
              lambda t, r, st: (f"RigL − Top-KAST {r.mean - t.mean:+.3f}, static − Top-KAST {st.mean - t.mean:+.3f}",
                                min(r.mean, st.mean) - t.mean >= 0.03))
    for name, note in (("topkast80_w272", ""), ("topkast90_w384", " (beyond the issue's targets)")):
        check(f"bigger-but-sparser: {ROWS[name].label}, non-zeros ≤ dense's, below dense by ≥ 0.05{note}", (name, "dense"),
              lambda w, d: (f"{w.mean:.3f}{n(w)} vs {d.mean:.3f} ({w.mean - d.mean:+.3f}); "
                            f"non-zeros {w.nonzero:,} vs {d.nonzero:,}",
                            d.mean - w.mean >= 0.05 and w.nonzero <= d.nonzero))
    return lines


# ------------------------------------------------------------------ step time
def step_times(overrides: list[str], rounds: int, steps: int) -> dict[str, float]:
    """Median seconds per training step of each setting, measured in interleaved rounds."""
    settings = {"dense": ["sparsity=dense"]}
    for backend in ("masked", "sparse"):
        settings[f"Top-KAST 80/60, {backend}"] = [*_topkast(0.8, 0.6), f"sparsity.backend={backend}"]
        settings[f"Top-KAST 90/80, {backend}"] = [*_topkast(0.9, 0.8), f"sparsity.backend={backend}"]
    for method in ("rigl", "static"):
        for s in (0.8, 0.9):
            settings[ROWS[f"{method}{round(s * 100)}"].label] = [f"sparsity={method}", f"sparsity.forward={s}"]
    with tempfile.TemporaryDirectory() as tmp:
        runs = {n: speed.make_run([*overrides, *o], Path(tmp) / str(i)) for i, (n, o) in enumerate(settings.items())}
        for run, batches, params in runs.values():
            speed.time_steps(run, batches, params, 2)
        times = {n: [] for n in runs}
        for _ in range(rounds):  # interleaved: drift in machine load hits all settings
            for n, (run, batches, params) in runs.items():
                times[n].append(speed.time_steps(run, batches, params, steps))
    return {n: statistics.median(t) for n, t in times.items()}


def measure_step_times(root: Path, quick: bool) -> None:
    """Step times of the width-128 model, kept in `root`/step_times.json for every later table."""
    rounds, steps = (1, 2) if quick else (3, 10)
    base = [o for o in ROWS["dense"].overrides(quick) if not o.startswith(("sparsity", "trainer.threads"))]
    print("lm: step times", flush=True)
    times = step_times([*base, "trainer.threads=2"], rounds, steps)
    root.mkdir(parents=True, exist_ok=True)
    (root / "step_times.json").write_text(json.dumps({"rounds": rounds, "steps": steps, "machine": machine(), "times": times}))


# ------------------------------------------------------------------ report
def defaults_line(quick: bool) -> str:
    """The optimizer, schedule and clipping the rows ran with, as composed."""
    from topkast_cli.config import compose, without_hydra

    cfg = without_hydra(compose("train", ROWS["dense"].overrides(quick)))
    opt, sch = cfg.optimizer, cfg.scheduler
    return (f"{str(opt._target_).rsplit('.', 1)[-1]} lr {opt.lr:g}, weight decay {opt.get('weight_decay', 0):g}; "
            f"schedule {sch.get('shape', '?')} with warm-up {sch.get('warmup', 0):g}; gradient clip {cfg.trainer.grad_clip}; "
            f"batch {cfg.dataset.batch_size}, context {cfg.dataset.context}")


def plot(stats: dict[str, Stats], path: Path, title: str) -> None:
    """Val bpc against step, one line per row (mean over its seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 4.8), dpi=120)
    for name, s in stats.items():
        if s.curve:
            wide = ROWS[name].width != 128
            ax.plot(list(s.curve), list(s.curve.values()), "--" if wide else "-", marker="." if not wide else "x",
                    color="black" if name == "dense" else None, label=f"{ROWS[name].label} ({len(s.finals)} seeds)")
    ax.set_xlabel("step")
    ax.set_ylabel("val bits per character")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def _pm(s: Stats) -> str:
    return "-" if s.mean is None else f"{s.mean:.3f} ± {s.sd:.3f}"


def report(root: Path, out: Path, quick: bool) -> Path:
    stats = collect(root)
    dense = stats.get("dense")
    steps = 20 if quick else STEPS
    title = f"Tiny Shakespeare, character Transformer (4 layers), {steps} steps" if not quick else "quick smoke run (numbers mean nothing)"
    text = header(f"Language model: {title}")
    text += (f"`python -m bench lm` (rows in batches: `python -m bench.lm --rows ...`). Every run: "
             f"`model=transformer dataset=textfile` on Tiny Shakespeare with the tool's LM defaults ({defaults_line(quick)}), "
             f"{steps} steps; width 128 and 4 heads unless the row says otherwise. Each method with its defaults "
             "(`topkast_cli/conf/sparsity/`) apart from the sparsities. Val bits per character on the whole val "
             f"split (the last 10% of the file, non-overlapping windows), every {EVAL_EVERY} steps; the final one, "
             "mean ± sd over the seeds done. Gap: row − dense. Train time: wall time of one run, two runs at a time "
             "on one thread each. Plot: [lm_tinyshakespeare.png](lm_tinyshakespeare.png).\n\n")
    text += "| row | val bpc | seeds | gap to dense | non-zero weights | dense weights | train time (s) |\n|---|---|---|---|---|---|---|\n"
    for name, s in stats.items():
        gap = "" if dense is None or dense.mean is None or s.mean is None or name == "dense" else f"{s.mean - dense.mean:+.3f}"
        failed = f" ({s.failed} failed)" if s.failed else ""
        sizes = f"{s.nonzero:,} | {s.params:,}" if s.nonzero is not None else "- | -"
        wall = f"{s.wall:.0f}" if s.wall is not None else "-"
        text += f"| {ROWS[name].label} | {_pm(s)} | {len(s.finals)}{failed} | {gap} | {sizes} | {wall} |\n"
    missing = [ROWS[n].label for n in ROWS if n not in stats]
    if missing:
        text += f"\nNot run yet: {', '.join(missing)}.\n"

    text += "\n## Targets (equal steps)\n\n| target | measured | |\n|---|---|---|\n"
    text += "".join(f"| {t} | {m} | {status} |\n" for t, m, status in targets(stats))

    partial = unfinished(root)
    if partial:
        steps_seen = sorted({step for c in partial.values() for step in c})
        text += ("\n## Runs that did not finish (stopped, or still running)\n\nVal bpc at the steps they reached, "
                 "beside dense's at the same step: no final value, so no row above and no target.\n\n"
                 "| run | " + " | ".join(map(str, steps_seen)) + " |\n|---|" + "---|" * len(steps_seen) + "\n")
        if dense is not None:
            text += "| dense (mean) | " + " | ".join(f"{dense.curve[k]:.3f}" if k in dense.curve else "-" for k in steps_seen) + " |\n"
        for label, c in partial.items():
            text += f"| {label} | " + " | ".join(f"{c[k]:.3f}" if k in c else "-" for k in steps_seen) + " |\n"

    curve_steps = sorted({step for s in stats.values() for step in s.curve})
    if curve_steps:
        text += "\n## Val bpc against step (mean over seeds)\n\n![val bpc against step](lm_tinyshakespeare.png)\n\n"
        text += "| row | " + " | ".join(map(str, curve_steps)) + " |\n|---|" + "---|" * len(curve_steps) + "\n"
        for name, s in stats.items():
            text += f"| {ROWS[name].label} | " + " | ".join(f"{s.curve[k]:.3f}" if k in s.curve else "-" for k in curve_steps) + " |\n"

    text += "\n## Step time against dense\n\n"
    saved = root / "step_times.json"
    if saved.is_file():
        t = json.loads(saved.read_text())
        times = t["times"]
        text += (f"Width 128, the same cached batches, one process on 2 threads; {t['rounds']} interleaved rounds x "
                 f"{t['steps']} steps, median round. Measured on: {t['machine']}.\n\n"
                 "| setting | ms / step | relative to dense |\n|---|---|---|\n"
                 + "".join(f"| {n} | {v * 1e3:.1f} | {v / times['dense']:.3f} |\n" for n, v in times.items()))
    else:
        text += "Not measured yet: `python -m bench.lm --no-run --step-times`.\n"

    path = write(out, "lm_tinyshakespeare.md", text)
    write_csv(stats, out / "lm_tinyshakespeare.csv")
    plot(stats, out / "lm_tinyshakespeare.png", title)
    return path


def write_csv(stats: dict[str, Stats], path: Path) -> None:
    dense = stats.get("dense")
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row", "label", "width", "heads", "val_bpc_mean", "val_bpc_sd", "seeds", "failed", "gap_to_dense",
                    "nonzero_weights", "dense_weights", "train_time_s"])
        for name, s in stats.items():
            gap = s.mean - dense.mean if dense and dense.mean is not None and s.mean is not None else None
            w.writerow([name, ROWS[name].label, ROWS[name].width, ROWS[name].heads, s.mean, s.sd if s.finals else None,
                        len(s.finals), s.failed, gap, s.nonzero, s.params, s.wall])


# ------------------------------------------------------------------ entry points
def main(out: Path = RESULTS, quick: bool = False, jobs: int = 2, runs: Path | None = None, rows: list[str] | None = None,
         seeds=SEEDS, run: bool = True, measure_steps: bool = True) -> list[Path]:
    if not SHAKESPEARE.is_file():
        print(f"lm: skipped, {SHAKESPEARE} is absent (the bench reads ../shared/data from the repository)")
        return []
    root = runs or (out / "runs" / "lm" if quick else Path("runs") / "lm")
    rows = rows or (list(QUICK_ROWS) if quick else list(ROWS))
    seeds = (0,) if quick else seeds
    if run:
        print(f"lm: {len(rows)} rows x {len(seeds)} seeds in {root}", flush=True)
        run_all(jobs_for(root, rows, seeds, quick), jobs)
    if measure_steps:
        measure_step_times(root, quick)
    return [report(root, out, quick)]


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.lm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="", help=f"comma-separated rows (default: all): {', '.join(ROWS)}")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--runs", type=Path, default=None, help="where the runs go (default: runs/lm)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-run", action="store_true", help="only tabulate the runs that exist")
    parser.add_argument("--step-times", action="store_true", help="measure the step times (else the saved ones are shown)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny model, 20 steps, one seed")
    args = parser.parse_args(argv)
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        sys.exit(f"unknown rows: {', '.join(unknown)}; rows: {', '.join(ROWS)}")
    main(args.out, quick=args.quick, jobs=args.jobs, runs=args.runs, rows=rows or None,
         seeds=tuple(int(s) for s in args.seeds.split(",")), run=not args.no_run, measure_steps=args.step_times)


if __name__ == "__main__":
    cli()
