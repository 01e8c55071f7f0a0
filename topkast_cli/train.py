"""topkast train: build everything from the config, then one flat training loop.

The loop calls the sparsity method's hooks and nothing else of it; everything it writes
goes to the run directory (Hydra's output dir): checkpoints/, metrics.jsonl,
sparsity.jsonl, tb/, summary.json, train.log.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from . import config
from .checkpoint import FORMAT_VERSION, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .errors import RunFailed, UserError
from .run_logs import RunLogs, write_json_atomic
from .sparsity import SparsityMethod, load_plain_state_dict, measured_density, plain_state_dict
from .tasks import accumulate, build_task, evaluate

log = logging.getLogger("topkast")


# --------------------------------------------------------------------------- set-up
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"trainer.device={name!r} is not a device; allowed: auto, cpu, cuda, cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"trainer.device={name} but no CUDA device is available; use trainer.device=auto or cpu")
    return device


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def autocast_factory(device: torch.device, precision: str):
    """A no-argument context factory for mixed precision, or None for fp32."""
    precision = str(precision)
    if precision == "32":
        return None
    if precision == "fp16" and device.type != "cuda":
        raise UserError("trainer.precision=fp16 needs a CUDA device; use bf16 on the CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)


def build_optimizer(make_optimizer, model: torch.nn.Module, method: SparsityMethod) -> torch.optim.Optimizer:
    """Sparse weights get no ordinary weight decay: the method's regulariser replaces it, and
    decay would move frozen entries outside the backward set."""
    sparse_ids = {id(p) for p in method.sparse_parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) not in sparse_ids]}]
    sparse = [p for p in params if id(p) in sparse_ids]
    if sparse:
        groups.append({"params": sparse, "weight_decay": 0.0})
    try:
        return make_optimizer(groups)
    except ValueError as e:  # torch's own range checks (e.g. nesterov without momentum)
        raise UserError(f"optimizer: {e}") from None


@dataclass
class Run:
    """Everything the loop works with."""

    cfg: DictConfig
    run_dir: Path
    device: torch.device
    data: object
    model: torch.nn.Module
    method: SparsityMethod
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    task: object
    autocast: object
    total_steps: int
    step: int = 0
    best: dict = field(default_factory=dict)
    last_eval: dict = field(default_factory=dict)
    skipped_steps: int = 0
    wall_before: float = 0.0  # seconds spent in earlier segments of a resumed run
    started: float = field(default_factory=time.perf_counter)

    @property
    def wall_time(self) -> float:
        return self.wall_before + time.perf_counter() - self.started

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def epoch(self) -> float:
        return self.step / self.data.steps_per_epoch


def build(cfg: DictConfig, run_dir: Path) -> Run:
    if cfg.trainer.get("threads"):
        torch.set_num_threads(cfg.trainer.threads)
    device = resolve_device(cfg.trainer.device)
    data = instantiate(cfg.dataset, _convert_="all").setup()
    seed_everything(cfg.seed, cfg.trainer.deterministic)  # after data: generators may reseed
    # (config.instantiate: a model constructor's UserError stays one line)
    model = config.instantiate(cfg.model, "model", num_classes=data.num_classes, input_shape=tuple(data.input_shape))
    model = model.to(device)
    t = cfg.trainer
    total_steps = t.max_steps if t.max_steps is not None else t.epochs * data.steps_per_epoch
    method = instantiate(cfg.sparsity, _convert_="all").attach(model, total_steps=total_steps)
    optimizer = build_optimizer(instantiate(cfg.optimizer, _convert_="all"), model, method)
    scheduler = instantiate(cfg.scheduler, _convert_="all")(optimizer, total_steps=total_steps)
    autocast = autocast_factory(device, t.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=str(t.precision) == "fp16")
    task = build_task(data.task, label_smoothing=t.label_smoothing)
    return Run(cfg, run_dir, device, data, model, method, optimizer, scheduler, scaler, task, autocast, total_steps)


# ----------------------------------------------------------------------- checkpoint
def checkpoint_state(run: Run) -> dict:
    sparsity = run.method.state_dict()
    return {
        "format_version": FORMAT_VERSION,
        "step": run.step,
        "epoch": run.epoch,
        "config": OmegaConf.to_container(run.cfg, resolve=True),
        "model": plain_state_dict(run.model),
        "masks": sparsity.pop("masks"),
        "sparsity": sparsity,
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "rng": rng_state(),
        "metrics": {
            "best": run.best,
            "last": run.last_eval,
            "skipped_steps": run.skipped_steps,
            "wall_time_s": run.wall_time,
        },
    }


def save(run: Run, name: str) -> Path:
    path = run.ckpt_dir / name
    if not all(bool(torch.isfinite(p).all()) for p in run.model.parameters()):
        raise RunFailed(f"parameters are not finite at step {run.step}; {name} not overwritten (lower optimizer.lr?)")
    try:
        save_checkpoint(path, checkpoint_state(run))
    except OSError as e:
        raise RunFailed(
            f"could not write checkpoint {path} at step {run.step}: {e.strerror or e}; the previous checkpoint is intact"
        ) from None
    return path


def resume_path(cfg: DictConfig, run_dir: Path) -> Path | None:
    if cfg.resume in (None, ""):
        return None
    if cfg.resume == "auto":
        last = run_dir / "checkpoints" / "last.ckpt"
        return last if last.exists() else None
    return Path(str(cfg.resume)).expanduser()


_MUST_MATCH = ("model", "dataset._target_", "sparsity._target_", "sparsity.forward", "sparsity.backward")


def restore(run: Run, path: Path) -> None:
    ckpt = load_checkpoint(path, key="resume")
    saved, now = ckpt["config"], OmegaConf.to_container(run.cfg, resolve=True)
    for key in _MUST_MATCH:
        a, b = OmegaConf.select(OmegaConf.create(saved), key), OmegaConf.select(OmegaConf.create(now), key)
        if a != b:
            raise UserError(f"resume={path}: the checkpoint has {key}={a}, the config has {b}; resume with the same {key}")
    try:
        load_plain_state_dict(run.model, ckpt["model"])
        run.method.load_state_dict({"masks": ckpt["masks"], **ckpt.get("sparsity", {})})
        run.optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0][:160]
        raise UserError(f"resume={path} does not fit this model/optimizer: {first}") from None
    run.scheduler.load_state_dict(ckpt["scheduler"])
    run.scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    run.step = int(ckpt["step"])
    metrics = ckpt.get("metrics") or {}
    run.best, run.last_eval = metrics.get("best") or {}, metrics.get("last") or {}
    run.skipped_steps = int(metrics.get("skipped_steps", 0))
    run.wall_before = float(metrics.get("wall_time_s", 0.0))


# ------------------------------------------------------------------------- signals
class StopSignals:
    """SIGINT/SIGTERM ask the loop to stop after the current step (it then checkpoints);
    a second signal stops at once."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread (e.g. some launchers): no handling
                pass
        return self

    def _handle(self, signum, frame):
        if self.received is not None:
            raise SystemExit(128 + signum)
        self.received = signum
        log.warning("received %s: stopping after this step and writing last.ckpt (again to stop now)", signal.Signals(signum).name)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


# ---------------------------------------------------------------------------- loop
def run_eval(run: Run, logs: RunLogs) -> dict:
    metrics = evaluate(run.model, run.data.eval_loader("val"), run.task, run.device, run.autocast)
    logs.log_metrics(run.step, "val", metrics)
    run.last_eval = {"step": run.step, **metrics}
    key = run.task.metric
    better = (lambda a, b: a > b) if run.task.higher_is_better else (lambda a, b: a < b)
    if not run.best or better(metrics[key], run.best[key]):
        run.best = {"step": run.step, **metrics}
        save(run, "best.ckpt")
    return metrics


def grads_finite(params) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    return bool(torch.isfinite(torch.stack([g.norm() for g in grads])).all())


def fit(run: Run, logs: RunLogs, stop: StopSignals) -> str:
    """The training loop. Returns "completed" or "interrupted"."""
    cfg, t = run.cfg, run.cfg.trainer
    model, method, optimizer, task = run.model, run.method, run.optimizer, run.task
    params = [p for g in optimizer.param_groups for p in g["params"]]
    spe = run.data.steps_per_epoch
    running, seen, tick = None, 0, time.perf_counter()
    postfix = {"density": f"{method.report(run.step)['forward_density']:.3f}"}
    bar = tqdm(total=run.total_steps, initial=run.step, desc="train", unit="step", disable=not t.progress, dynamic_ncols=True)
    model.train()
    while run.step < run.total_steps:
        epoch, offset = divmod(run.step, spe)
        for x, y in run.data.train_loader(epoch, cfg.seed, offset):
            x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
            method.before_forward(run.step)
            with run.autocast() if run.autocast else torch.enable_grad():
                out = model(x)
                loss = task.loss(out, y)
            finite = bool(torch.isfinite(loss))
            if not finite and not t.skip_nonfinite:
                raise RunFailed(
                    f"loss is {loss.item()} at step {run.step + 1}; stopped, last good checkpoint: "
                    f"{run.ckpt_dir / 'last.ckpt'} (lower optimizer.lr, or trainer.skip_nonfinite=true)"
                )
            if finite:
                optimizer.zero_grad(set_to_none=True)
                run.scaler.scale(loss).backward()
                run.scaler.unscale_(optimizer)
                method.after_backward(run.step)
                if t.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
                finite = run.scaler.is_enabled() or not t.skip_nonfinite or grads_finite(params)
                if finite:
                    run.scaler.step(optimizer)  # (fp16: skipped by the scaler itself on inf)
                run.scaler.update()
            if not finite:
                run.skipped_steps += 1  # a skipped step still counts: the data order stays aligned
            run.scheduler.step()
            run.step += 1
            bar.update(1)
            if method.after_step(run.step, optimizer):
                report = method.report(run.step)
                logs.log_sparsity(report)
                postfix["density"] = f"{report['forward_density']:.3f}"
            if finite:
                running = accumulate(running, task.batch_sums(out.detach(), y))
            seen += y.shape[0]

            last = run.step >= run.total_steps
            if run.step % t.log_every == 0 or last:
                now = time.perf_counter()
                train = task.finalize(running) if running else {"loss": float("nan"), task.metric: float("nan")}
                train["lr"] = optimizer.param_groups[0]["lr"]
                train["samples_per_sec"] = seen / max(now - tick, 1e-9)
                reg = method.regularization()
                if reg is not None:
                    train["regularization"] = reg
                if run.skipped_steps:
                    train["skipped_steps"] = run.skipped_steps
                logs.scalars("train", train, run.step)
                running, seen, tick = None, 0, now
                postfix.update(loss=f"{train['loss']:.3f}", **{task.metric: f"{train[task.metric]:.1f}"})
            if (t.eval_every and run.step % t.eval_every == 0) or last:
                val = run_eval(run, logs)
                postfix[f"val_{task.metric}"] = f"{val[task.metric]:.1f}"
                log.info("step %d  val loss %.4f  %s %.2f", run.step, val["loss"], task.metric, val[task.metric])
            if (t.checkpoint_every and run.step % t.checkpoint_every == 0) or last or stop.received:
                save(run, "last.ckpt")
                logs.flush()
            if postfix:
                bar.set_postfix(postfix, refresh=False)
            if stop.received:
                bar.close()
                return "interrupted"
            if last:
                break
    bar.close()
    return "completed"


def summarize(run: Run, status: str, segment_wall: float, start_step: int, error: str | None = None) -> dict:
    """summary.json: wall time is the whole run's (all resumed segments), speed this segment's."""
    m = run.method
    density = measured_density(run.model)
    summary = {
        "status": status,
        "method": m.name if m.layers else "dense",
        "forward_sparsity": m.forward_sparsity,
        "backward_sparsity": m.backward_sparsity,
        "metric": run.task.metric,
        "step": run.step,
        "total_steps": run.total_steps,
        "epochs": run.epoch,
        "wall_time_s": run.wall_time,
        "steps_per_sec": (run.step - start_step) / max(segment_wall, 1e-9),
        "final": run.last_eval,
        "best": run.best,
        "density": density,
        "skipped_steps": run.skipped_steps,
        "seed": run.cfg.seed,
    }
    if error:
        summary["error"] = error
    return summary


def hparams(cfg: DictConfig, method: SparsityMethod) -> dict:
    """The run's hyperparameters for TensorBoard's HPARAMS view (flat, scalar values)."""
    flat = {"seed": cfg.seed, "method": method.name if method.layers else "dense"}
    for section in ("model", "dataset", "sparsity", "optimizer", "scheduler"):
        if not isinstance(cfg.get(section), DictConfig):
            continue
        node = OmegaConf.to_container(cfg[section], resolve=True)
        flat[section] = str(node.get("_target_", "")).rsplit(".", 1)[-1]
        for key, value in node.items():
            if not key.startswith("_") and key not in ("root", "num_workers"):
                flat[f"{section}.{key}"] = value
    flat["sparsity.forward"], flat["sparsity.backward"] = method.forward_sparsity, method.backward_sparsity
    flat["trainer.max_steps"], flat["trainer.epochs"] = cfg.trainer.max_steps, cfg.trainer.epochs
    return flat


def train(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Train as `cfg` says, writing into `run_dir`; returns the summary."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    run = build(cfg, run_dir)
    run.started = t0  # wall time includes building (data generation/loading)
    ckpt = resume_path(cfg, run_dir)
    if ckpt is not None:
        restore(run, ckpt)
        log.info("resumed from %s at step %d", ckpt, run.step)
    elif (run.ckpt_dir / "last.ckpt").exists():
        raise UserError(
            f"{run_dir} already holds a run (checkpoints/last.ckpt); continue it with resume=auto, "
            "or choose another hydra.run.dir"
        )
    start_step = run.step
    logs = RunLogs(run_dir, resume_step=start_step if ckpt is not None else None, tensorboard=cfg.trainer.tensorboard)
    m = run.method
    log.info(
        "%s: %d sparse layers, forward sparsity %.3f, backward sparsity %.3f; %d steps (%.1f epochs) on %s",
        m.name if m.layers else "dense", len(m.layers), m.forward_sparsity, m.backward_sparsity,
        run.total_steps, run.total_steps / run.data.steps_per_epoch, run.device,
    )
    status, error = "failed", None
    try:
        if ckpt is None:
            logs.log_sparsity(m.report(run.step))
            logs.log_hparams(hparams(cfg, m), [f"val/{run.task.metric}", "val/loss", "train/loss"])
        with StopSignals() as stop:
            status = fit(run, logs, stop)
        if run.step > start_step:  # (a resumed run that was already complete adds nothing)
            logs.log_sparsity(m.report(run.step))
        return_code = 0 if status == "completed" else 128 + (stop.received or 0)
    except BaseException as e:
        error = str(e).splitlines()[0] if str(e) else type(e).__name__
        status = "interrupted" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "failed"
        raise
    finally:
        summary = summarize(run, status, time.perf_counter() - t0, start_step, error)
        write_json_atomic(run_dir / "summary.json", summary)
        if status == "completed":
            logs.end_hparams()
        logs.close()
    final, best = summary["final"], summary["best"]
    if final:
        log.info(
            "%s at step %d: val %s %.2f (best %.2f at step %d), density %.4f of sparse weights, %.1f s",
            status, run.step, run.task.metric, final[run.task.metric], best[run.task.metric], best["step"],
            summary["density"]["sparse_density"], summary["wall_time_s"],
        )
    if return_code:
        raise SystemExit(return_code)
    return summary
