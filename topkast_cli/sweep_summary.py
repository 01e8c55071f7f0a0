"""The summary of a sweep (`topkast sweep`, a Hydra multirun of the training task).

The sweep's jobs are the sweeper parameters of sweep.yaml merged with the command line's, as
Hydra's basic sweeper merges them (`merge_params`). When the jobs end, the
`SweepSummary` callback reads each job's summary.json and writes at the sweep root:
summary.csv (one row per job), summary.md (one row per setting, mean ± std over seeds) and
accuracy_vs_sparsity.png. A job that failed is a row marked failed, also when it failed before
writing its summary.json (its error is taken from its log); a job directory without a
summary.json or an error is "incomplete" (running, or killed), and a job that never started
is a row marked missing. The command exits with 1 if any job did not complete.

`topkast sweep --summarize DIR` (or `summarize=DIR`) rebuilds the summary of a sweep directory
without training.
"""

from __future__ import annotations

import csv
import json
import logging
import statistics
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from .config import expand_sweep, instantiate
from .errors import UserError

log = logging.getLogger("topkast")

FILES = ("summary.csv", "summary.md", "accuracy_vs_sparsity.png")
state: dict = {"root": None, "summary": None}  # set by the callback in the launching process


# ------------------------------------------------------------------- sweep jobs
def merge_params(params: dict | None, overrides: list[str]) -> list[str]:
    """The sweep as Hydra's basic sweeper sees it: sweeper params, then the command line's
    overrides; a key given again replaces the earlier value (keeping its place)."""
    lines = [f"{k}={v}" for k, v in (params or {}).items()] + list(overrides)
    if not lines:
        return []
    try:
        parsed = OverridesParser.create().parse_overrides(lines)
    except Exception as e:
        raise UserError(str(e).strip().splitlines()[0]) from None
    by_key = {}
    for line, o in zip(lines, parsed):
        by_key[o.get_key_element()] = (line, o)
    return [line for line, _ in by_key.values()]


def parsed_overrides(lines: list[str]):
    return OverridesParser.create().parse_overrides(list(lines)) if lines else []


def _job_key(lines) -> frozenset:
    """Order- and spelling-independent identity of one job's overrides."""
    return frozenset((o.get_key_element(), o.get_value_element_as_str()) for o in parsed_overrides([str(l) for l in lines]))


def expected_jobs(multirun_yaml: Path) -> list[list[str]]:
    """Every job of a sweep, from the multirun.yaml Hydra writes at the sweep root."""
    cfg = OmegaConf.load(multirun_yaml)
    params = OmegaConf.to_container(OmegaConf.select(cfg, "hydra.sweeper.params") or OmegaConf.create({}))
    task = [str(o) for o in OmegaConf.select(cfg, "hydra.overrides.task", default=[])]
    return expand_sweep(merge_params(params, task))


# ---------------------------------------------------------------------- collect
def _short(target) -> str:
    return str(target or "?").rsplit(".", 1)[-1]


def _log_error(job_dir: Path) -> str | None:
    """The last error a job logged (its exception's last line after a traceback)."""
    for path in sorted(job_dir.glob("*.log")):
        lines = path.read_text(errors="replace").splitlines()
        for i in range(len(lines) - 1, -1, -1):
            if "[ERROR]" in lines[i]:
                message = lines[i].split("[ERROR]", 1)[1].strip()
                rest = [l.strip() for l in lines[i + 1 :] if l.strip() and not l.startswith("[")]
                return rest[-1] if rest and message == "job failed" else message
    return None


def _metric(record: dict | None, metric: str):
    return (record or {}).get(metric)


def job_row(job_dir: Path, root: Path) -> dict:
    """One job's row: from its summary.json, or from its config when there is none."""
    config = OmegaConf.load(job_dir / ".hydra" / "config.yaml") if (job_dir / ".hydra" / "config.yaml").is_file() else OmegaConf.create({})
    overrides = OmegaConf.load(job_dir / ".hydra" / "overrides.yaml") if (job_dir / ".hydra" / "overrides.yaml").is_file() else []
    summary = None
    if (job_dir / "summary.json").is_file():
        try:
            summary = json.loads((job_dir / "summary.json").read_text())
        except json.JSONDecodeError:
            summary = None
    method = _method(config)
    row = {
        "job": str(job_dir.relative_to(root)),
        "overrides": [str(o) for o in overrides],
        "status": "missing",
        "method": method.display_name if method else None,
        "model": _short(OmegaConf.select(config, "model._target_")),
        "dataset": _short(OmegaConf.select(config, "dataset._target_")),
        "forward_sparsity": method.forward_sparsity if method else None,
        "backward_sparsity": method.backward_sparsity if method else None,
        "backward_setting": method.backward_rule if method else "-",
        "seed": config.get("seed"),
        "sparse_density": None,
        "density": None,
        "nonzero": None,  # non-zero weights of the whole model (what inference computes with)
        "params": None,  # its dense weights
        "train_flops": None,
        "train_flops_per": None,
        "metric": None,
        "best": None,
        "best_step": None,
        "final": None,
        "final_loss": None,
        "steps": None,
        "total_steps": None,
        "wall_time_s": None,
        "error": None,
    }
    if summary is not None:
        metric = summary.get("metric")
        density = summary.get("density") or {}
        row.update(
            status=summary.get("status", "failed"),
            method=summary.get("method", row["method"]),
            forward_sparsity=summary.get("forward_sparsity", row["forward_sparsity"]),
            backward_sparsity=summary.get("backward_sparsity", row["backward_sparsity"]),
            sparse_density=density.get("sparse_density"),
            density=density.get("density"),
            nonzero=density.get("nonzero"),
            params=density.get("params"),
            train_flops=summary.get("train_flops"),
            train_flops_per=summary.get("train_flops_per"),
            metric=metric,
            best=_metric(summary.get("best"), metric),
            best_step=(summary.get("best") or {}).get("step"),
            final=_metric(summary.get("final"), metric),
            final_loss=(summary.get("final") or {}).get("loss"),
            steps=summary.get("step"),
            total_steps=summary.get("total_steps"),
            wall_time_s=summary.get("wall_time_s"),
            error=summary.get("error"),
        )
    else:
        row["error"] = _log_error(job_dir)
        row["status"] = "failed" if row["error"] else "incomplete"
        row["error"] = row["error"] or "no summary.json: still running, or killed"
    return row


def _method(config):
    """The job's sparsity method, built from its config: it describes itself (name, backward
    rule). None when the job has no config (it never started) or one that no longer builds."""
    if "sparsity" not in config:
        return None
    try:
        return instantiate(config.sparsity, "sparsity")
    except UserError:
        return None


def collect(root: Path) -> list[dict]:
    """One row per job of the sweep in `root`."""
    job_dirs = sorted(
        p.parent for p in root.rglob(".hydra")
        if p.is_dir() and p.parent != root and ".submitit" not in p.relative_to(root).parts
    )
    rows = [job_row(d, root) for d in job_dirs]
    if (root / "multirun.yaml").is_file():
        seen = {_job_key(r["overrides"]) for r in rows}
        for job in expected_jobs(root / "multirun.yaml"):
            if _job_key(job) not in seen:
                rows.append({"job": None, "overrides": job, "status": "missing",
                             "error": "no job directory: the job did not start"})
    return rows


# ---------------------------------------------------------------------- tables
KEYS_SHOWN = {"seed", "sparsity", "sparsity.forward", "sparsity.backward", "resume"}


def varying_keys(rows: list[dict]) -> list[str]:
    """Swept keys other than sparsity and seed (e.g. optimizer.lr): extra table columns."""
    values: dict[str, set] = {}
    for r in rows:
        for o in parsed_overrides(r["overrides"]):
            values.setdefault(o.get_key_element(), set()).add(o.get_value_element_as_str())
    n = len(rows)
    counts = {k: sum(any(o.get_key_element() == k for o in parsed_overrides(r["overrides"])) for r in rows) for k in values}
    return sorted(k for k, v in values.items() if k not in KEYS_SHOWN and (len(v) > 1 or counts[k] < n))


def _extras(row: dict, keys: list[str]) -> tuple:
    found = {o.get_key_element(): o.get_value_element_as_str() for o in parsed_overrides(row["overrides"])}
    return tuple(found.get(k, "") for k in keys)


def _sort_key(row: dict):
    return (str(row.get("method")), str(row.get("backward_setting")), float(row.get("forward_sparsity") or 0), str(row.get("seed")))


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _pm(values: list[float], digits: int = 2) -> str:
    if not values:
        return "-"
    mean, std = _mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def groups(rows: list[dict], extras: list[str]) -> list[tuple[tuple, list[dict]]]:
    """Rows of one setting (method, sparsities, backward rule, extra keys), seeds together."""
    out: dict[tuple, list[dict]] = {}
    for r in sorted((r for r in rows if r.get("method")), key=_sort_key):
        key = (r["method"], r["forward_sparsity"], r["backward_sparsity"], r["backward_setting"], _extras(r, extras))
        out.setdefault(key, []).append(r)
    return list(out.items())


def _count(values: list, si: bool = False) -> str:
    """A count of one setting (the same for every seed, so the mean): weights exact, FLOPs in
    K/M/G."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = statistics.fmean(values)
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)) if si else ():
        if mean >= scale:
            return f"{mean / scale:.3g}{unit}"
    return f"{mean:,.0f}"


def markdown(rows: list[dict]) -> str:
    extras = varying_keys(rows)
    metric = next((r["metric"] for r in rows if r.get("metric")), "metric")
    per = next((r["train_flops_per"] for r in rows if r.get("train_flops_per")), "example")
    head = ["method", "forward", "backward", "density", *extras, "non-zero weights", "dense weights",
            f"train FLOPs / {per}", "runs", f"best {metric}", f"final {metric}", "wall time", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for (method, forward, backward, _, extra), members in groups(rows, extras):
        done = [m for m in members if m["status"] == "completed"]
        statuses = [m["status"] for m in members]
        status = statuses[0] if len(set(statuses)) == 1 else ", ".join(f"{statuses.count(s)} {s}" for s in sorted(set(statuses)))
        density = [m["sparse_density"] for m in done if m["sparse_density"] is not None]
        wall = [m["wall_time_s"] for m in done if m["wall_time_s"] is not None]
        cells = [
            method, f"{forward:.2f}", f"{backward:.2f}", f"{statistics.fmean(density):.4f}" if density else "-", *extra,
            _count([m["nonzero"] for m in done]), _count([m["params"] for m in done]), _count([m["train_flops"] for m in done], si=True),
            str(len(members)) if len(done) == len(members) else f"{len(done)}/{len(members)}",
            _pm([m["best"] for m in done if m["best"] is not None]),
            _pm([m["final"] for m in done if m["final"] is not None]),
            f"{statistics.fmean(wall):.0f} s" if wall else "-", status,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    bad = [r for r in rows if r["status"] != "completed"]
    if bad:
        lines += ["", "Jobs that did not complete:", ""]
        for r in bad:
            where = r["job"] or " ".join(r["overrides"])
            lines.append(f"- `{where}`: {r['status']}" + (f": {r['error']}" if r.get("error") else ""))
    return "\n".join(lines) + "\n"


CSV_FIELDS = [
    "job", "status", "method", "forward_sparsity", "backward_sparsity", "backward_setting", "seed",
    "sparse_density", "density", "nonzero", "params", "train_flops", "train_flops_per", "metric", "best", "best_step", "final", "final_loss", "steps", "total_steps",
    "wall_time_s", "model", "dataset", "overrides", "error",
]


def write_csv(rows: list[dict], path: Path) -> None:
    extras = varying_keys(rows)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS[:7] + extras + CSV_FIELDS[7:], extrasaction="ignore")
        writer.writeheader()
        for r in sorted(rows, key=lambda r: (r.get("method") is None, _sort_key(r))):
            out = {**r, **dict(zip(extras, _extras(r, extras))), "overrides": " ".join(r["overrides"])}
            writer.writerow({k: ("" if v is None else v) for k, v in out.items()})
    tmp.replace(path)


def plot(rows: list[dict], path: Path) -> None:
    """Final metric vs forward sparsity: one line per method / backward setting (and extra
    swept keys), error bars = std over seeds; dense runs as a horizontal baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["status"] == "completed" and r.get("final") is not None]
    extras = varying_keys(rows)
    metric = next((r["metric"] for r in done), "metric")
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    lines: dict[tuple, dict[float, list[float]]] = {}
    baselines: dict[tuple, list[float]] = {}
    for r in done:
        extra = _extras(r, extras)
        if r["method"] == "dense":
            baselines.setdefault(extra, []).append(r["final"])
        else:
            lines.setdefault((r["method"], r["backward_setting"], extra), {}).setdefault(r["forward_sparsity"], []).append(r["final"])
    colors = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4)
    xs_all = sorted({x for points in lines.values() for x in points})
    for extra, values in sorted(baselines.items()):
        mean, std = _mean_std(values)
        color = next(colors)
        label = "dense" + "".join(f", {k}={v}" for k, v in zip(extras, extra) if v)
        ax.axhline(mean, color=color, linestyle="--", label=f"{label} ({mean:.1f})")
        if std:
            ax.axhspan(mean - std, mean + std, color=color, alpha=0.12)
    for (method, setting, extra), points in sorted(lines.items()):
        xs = sorted(points)
        stats = [_mean_std(points[x]) for x in xs]
        label = method + ("" if setting in ("-", None) else f", backward {'density = 2x forward' if setting == '2x density' else setting}")
        label += "".join(f", {k}={v}" for k, v in zip(extras, extra) if v)
        ax.errorbar(xs, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3, label=label, color=next(colors))
    if xs_all:
        ax.set_xticks(xs_all)
        ax.set_xticklabels([f"{x:g}" for x in xs_all])
    if not done:
        ax.text(0.5, 0.5, "no completed runs", ha="center", va="center", transform=ax.transAxes)
    seeds = max((len(v) for points in lines.values() for v in points.values()), default=1)
    first = done[0] if done else {}
    ax.set_title(f"{first.get('model', '')} on {first.get('dataset', '')}" + (f" ({seeds} seeds, ± std)" if seeds > 1 else ""))
    ax.set_xlabel("forward sparsity")
    ax.set_ylabel(f"final {metric} (held-out split)")
    ax.grid(alpha=0.3)
    if done:
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(".tmp." + path.name)
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(path)


def summarize(root: str | Path, echo: bool = True) -> dict:
    """Write summary.csv, summary.md and accuracy_vs_sparsity.png at the sweep root."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(f"summarize={root}: no such directory")
    rows = collect(root)
    if not rows:
        raise UserError(f"summarize={root} is not a sweep directory (no job directories with .hydra/, no multirun.yaml)")
    write_csv(rows, root / "summary.csv")
    table = markdown(rows)
    tmp = root / ".summary.md.tmp"
    tmp.write_text(table)
    tmp.replace(root / "summary.md")
    plot(rows, root / "accuracy_vs_sparsity.png")
    failed = sum(r["status"] != "completed" for r in rows)
    if echo:
        print(f"\nsweep summary ({len(rows)} jobs, {failed} not completed): {root}\n\n{table}")
    return {"root": str(root), "rows": rows, "failed": failed}


class SweepSummary(Callback):
    """Hydra callback: write the summary when the multirun ends."""

    def on_multirun_start(self, config, **kwargs) -> None:
        state["root"], state["summary"] = Path(str(config.hydra.sweep.dir)), None

    def on_multirun_end(self, config, **kwargs) -> None:
        state["summary"] = summarize(Path(str(config.hydra.sweep.dir)))
