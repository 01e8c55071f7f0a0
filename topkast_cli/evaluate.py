"""topkast eval ckpt=PATH: evaluate a checkpoint's sparse network on the held-out split.

The model, dataset and sparsity method are rebuilt from the config stored in the checkpoint;
θ and the masks are loaded as a resumed run would load them, and the network is evaluated with
the weights it computes with, α = θ ⊙ 1_A (`eval.dense=true`: θ). Besides the task metric it
reports, per Conv/Linear layer and in total, the measured density of those weights (counted from
the tensors, not read from the config) and the forward FLOPs against the dense model, for one
sample of the evaluated split. The report is printed as a table and written as JSON next to the
checkpoint (`<name>.eval.json`, or `eval.output`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict

from .checkpoint import load_checkpoint
from .config import PRECISIONS, compose
from .errors import UserError
from .flops import count_flops, total
from .run import build_run, kept_torch_settings, restore
from .run_logs import write_json_atomic
from .tasks import evaluate

log = logging.getLogger("topkast")

# Loader and device settings of the training config that eval may change, and their eval keys.
ALIASES = {
    "dataset.root": "eval.data_root",
    "dataset.eval_batch_size": "eval.batch_size",
    "dataset.num_workers": "eval.num_workers",
    "trainer.device": "eval.device",
    "trainer.precision": "eval.precision",
    "trainer.progress": "eval.progress",
}
ALLOWED = "ckpt, eval.split, eval.dense, eval.batch_size, eval.num_workers, eval.data_root, eval.device, eval.precision, eval.progress, eval.output"

_loaded: dict[str, dict] = {}


def load(path: str) -> dict:
    """The checkpoint, loaded once per process (the CLI checks it before Hydra starts)."""
    key = str(Path(path).expanduser().resolve())
    if key not in _loaded:
        _loaded.clear()
        _loaded[key] = load_checkpoint(path, key="ckpt")
    return _loaded[key]


# ------------------------------------------------------------------- overrides
def _same_group_option(group: str, option, saved) -> bool:
    """Does `group=option` name the object the checkpoint was built with?"""
    cfg = compose("train", [f"{group}={option}"])
    return OmegaConf.select(cfg, f"{group}._target_") == (saved or {}).get("_target_")


def checkpoint_overrides(overrides: list[str], saved: dict) -> list[str]:
    """Overrides for the eval config: training-config keys that eval may change are mapped to
    their eval.* keys (ALIASES); any other training-config key must agree with the checkpoint
    (it is then dropped), since the model and data are rebuilt from the checkpoint."""
    saved_cfg = OmegaConf.create(saved)
    out = []
    for text in overrides:
        try:
            o = OverridesParser.create().parse_overrides([text])[0]
        except Exception:
            out.append(text)  # Hydra reports the syntax error
            continue
        key = o.key_or_group
        if key.split(".")[0] in ("ckpt", "eval", "hydra") or key.split(".")[0] not in saved:
            out.append(text)
            continue
        if o.is_sweep_override():
            raise UserError(f"{text}: eval evaluates one checkpoint; sweeps are not supported")
        if key in ALIASES and not (o.is_add() or o.is_delete()):
            out.append(f"{ALIASES[key]}={o.get_value_element_as_str()}")
            continue
        was = OmegaConf.select(saved_cfg, key, default=None)
        if OmegaConf.is_config(was):
            was = OmegaConf.to_container(was)
        value = o.value()
        if isinstance(was, dict) and isinstance(value, str) and not (o.is_add() or o.is_delete()):
            agrees = _same_group_option(key, value, was)
            shown = f"{key} {was.get('_target_')}"
        else:
            agrees = not (o.is_add() or o.is_delete()) and value == was
            shown = f"{key}={was}"
        if not agrees:
            raise UserError(
                f"{text} contradicts the checkpoint (trained with {shown}); eval rebuilds model, data "
                f"and sparsity from the checkpoint; allowed overrides: {ALLOWED}"
            )
    return out


# ------------------------------------------------------------------ validation
def default_output(ckpt: str, split: str, dense: bool) -> Path:
    p = Path(ckpt).expanduser()
    parts = [p.stem, "eval"] + ([split] if split != "val" else []) + (["dense"] if dense else [])
    return p.with_name(".".join(parts) + ".json")


def output_path(cfg: DictConfig) -> Path:
    e = cfg.eval
    if e.output is None:
        return default_output(str(cfg.ckpt), str(e.split), bool(e.dense))
    out = Path(str(e.output)).expanduser()
    return out / default_output(str(cfg.ckpt), str(e.split), bool(e.dense)).name if out.is_dir() else out


def validate_eval(cfg: DictConfig) -> None:
    if OmegaConf.is_missing(cfg, "ckpt") or cfg.ckpt in (None, ""):
        raise UserError("ckpt=PATH is required, e.g. topkast eval ckpt=runs/train/<run>/checkpoints/best.ckpt")
    e = cfg.eval
    if not isinstance(e.split, str) or not e.split:
        raise UserError(f"eval.split={e.split!r} must be a split name (val, train)")
    for key in ("dense", "progress"):
        if not isinstance(e[key], bool):
            raise UserError(f"eval.{key}={e[key]!r} must be true or false")
    for key, lo in (("batch_size", 1), ("num_workers", 0)):
        v = e[key]
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < lo):
            raise UserError(f"eval.{key}={v!r} is not allowed; it must be an integer >= {lo} (or null)")
    if not isinstance(e.device, str) or not (e.device in ("auto", "cpu") or e.device.split(":")[0] in ("cuda", "mps")):
        raise UserError(f"eval.device={e.device!r} is not allowed; allowed: auto, cpu, cuda, cuda:N")
    if e.precision is not None and str(e.precision) not in PRECISIONS:
        raise UserError(f"eval.precision={e.precision!r} is not allowed; allowed: {', '.join(PRECISIONS)} (or null)")
    if e.data_root is not None and not isinstance(e.data_root, str):
        raise UserError(f"eval.data_root={e.data_root!r} must be a directory path")


# ------------------------------------------------------------------ evaluation
def _adapt(error: UserError) -> UserError:
    return UserError(str(error).replace("trainer.device", "eval.device").replace("trainer.precision", "eval.precision"))


def run_config(state: dict, e: DictConfig) -> DictConfig:
    """The checkpoint's training config with what eval may change (loader, device, precision)."""
    saved = OmegaConf.create(state["config"])
    with open_dict(saved):
        for key, value in (("root", e.data_root), ("eval_batch_size", e.batch_size), ("num_workers", e.num_workers)):
            if value is None:
                continue
            if key == "root" and "root" not in saved.dataset:
                raise UserError(f"eval.data_root: dataset {saved.dataset.get('_target_')} takes no root")
            saved.dataset[key] = value
        saved.trainer.device = e.device
        saved.trainer.precision = str(e.precision if e.precision is not None else saved.trainer.get("precision", "32"))
    return saved


@kept_torch_settings()
def evaluate_checkpoint(cfg: DictConfig) -> dict:
    """Evaluate `cfg.ckpt` as `cfg.eval` says; write the JSON report; return it."""
    e = cfg.eval
    state = load(str(cfg.ckpt))
    try:
        run = build_run(run_config(state, e))
        restore(run, state, f"ckpt={cfg.ckpt}", training=False)
    except UserError as err:
        raise _adapt(err) from None
    model, method, task, device = run.model, run.method, run.task, run.device
    precision = str(run.cfg.trainer.precision)
    if e.dense:
        method.use_dense_weights(True)
    loader = run.data.eval_loader(e.split)
    log.info("evaluating %s (step %s) on %s: %s network", cfg.ckpt, state["step"], e.split, "dense θ" if e.dense else "sparse α")
    metrics = evaluate(model, loader, task, device, run.autocast, progress=e.progress, desc=f"eval {e.split}")

    example = loader.dataset[0][0].unsqueeze(0).to(device)
    layers = count_flops(model, example)
    sparse = {layer.name for layer in method.layers}
    logged = (state.get("metrics") or {}).get("last") or {}
    report = {
        "ckpt": str(cfg.ckpt),
        "step": int(state["step"]),
        "split": e.split,
        "samples": len(loader.dataset),
        "weights": "dense" if e.dense else "sparse",
        "method": method.display_name,
        "forward_sparsity": method.forward_sparsity,
        "backward_sparsity": method.backward_sparsity,
        "metric": task.metric,
        "metrics": metrics,
        "logged": logged if logged.get("step") == state["step"] else None,
        "density": method.measured_density(model),
        "flops": {**total(layers), "input_shape": list(example.shape[1:])},
        "layers": [{**l.to_dict(), "sparse": f"{l.name}.weight" in sparse} for l in layers],
        "device": str(device),
        "precision": precision,
    }
    out = output_path(cfg)
    write_json_atomic(out, report)
    print(format_report(report, out))
    return report


# -------------------------------------------------------------------- display
def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def format_report(r: dict, out: Path | None = None) -> str:
    weights = "dense θ (eval.dense=true)" if r["weights"] == "dense" else "sparse network α"
    head = f"{r['ckpt']} (step {r['step']}), {weights}, split {r['split']} ({r['samples']} samples)"
    metric = r["metric"]
    values = [f"{metric} {r['metrics'][metric]:.2f}"] + [
        f"{k} {v:.4f}" if k == "loss" else f"{k} {v:.2f}" for k, v in r["metrics"].items() if k != metric
    ]
    rows = [("layer", "type", "weight", "params", "nonzero", "density", "FLOPs dense", "FLOPs", "ratio")]
    for l in r["layers"]:
        rows.append((
            l["name"] + (" *" if l["sparse"] else ""), l["type"], "x".join(map(str, l["weight_shape"])),
            f"{l['params']:,}", f"{l['nonzero']:,}", f"{l['density']:.4f}",
            _si(l["dense_flops"]), _si(l["flops"]), f"{l['flops'] / max(1, l['dense_flops']):.4f}",
        ))
    f = r["flops"]
    n_params, n_nonzero = sum(l["params"] for l in r["layers"]), sum(l["nonzero"] for l in r["layers"])
    rows.append(("Conv/Linear weights", "", "", f"{n_params:,}", f"{n_nonzero:,}", f"{n_nonzero / max(1, n_params):.4f}",
                 _si(f["dense_flops"]), _si(f["flops"]), f"{f['ratio']:.4f}"))
    d = r["density"]
    rows.append(("all parameters", "", "", f"{d['params']:,}", f"{d['nonzero']:,}", f"{d['density']:.4f}", "", "", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    left = (0, 1, 2)

    def line(row):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    rule = "-" * len(line(rows[0]))
    table = [line(rows[0]), rule, *map(line, rows[1:-2]), rule, *map(line, rows[-2:])]
    lines = [
        head,
        "  " + "   ".join(values),
        "",
        *table,
        "* sparse layer; density = nonzero / params of the weights the network computes with; "
        f"FLOPs = 2 x multiply-adds of Conv/Linear layers for one input of shape {'x'.join(map(str, f['input_shape']))}",
        f"sparse density {d['sparse_density']:.4f} over the sparse layers; forward FLOPs {_si(f['flops'])} "
        f"= {f['ratio']:.3f} x dense ({_si(f['dense_flops'])})",
    ]
    if out is not None:
        lines.append(f"report: {out}")
    return "\n".join(lines)
