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
    saved_step: int | None = None  # step of the last.ckpt on disk (None: none written yet)
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
    total_steps = config.run_length(t, data.steps_per_epoch)
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
            f"could not write checkpoint {path} at step {run.step}: {e.strerror or e}; "
            + (f"the previous {name} is intact" if path.exists() else f"no {name} was written")
        ) from None
    if name == "last.ckpt":
        run.saved_step = run.step
    return path


def resume_path(cfg: DictConfig, run_dir: Path) -> Path | None:
    if cfg.resume in (None, ""):
        return None
    if cfg.resume == "auto":
        last = Path(run_dir) / "checkpoints" / "last.ckpt"
        return last if last.exists() else None
    return Path(str(cfg.resume)).expanduser()


def holds_run(run_dir: Path) -> bool:
    """Whether `run_dir` has outputs of a training run (a fresh run there would mix with them)."""
    run_dir = Path(run_dir)
    return any((run_dir / name).exists() for name in ("checkpoints", "metrics.jsonl", "sparsity.jsonl", "summary.json"))


# Config that must be the same to resume; the rest (steps, schedules, logging, refresh
# interval, exploration steps, regularisation) may change.
_MUST_MATCH = ("model", "dataset._target_", "optimizer._target_", "sparsity")
_MAY_CHANGE = ("sparsity.refresh_interval", "sparsity.exploration_steps", "sparsity.regularization")


def _get(tree, dotted: str):
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _leaves(node, prefix: str) -> dict:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(_leaves(v, f"{prefix}.{k}"))
        return out
    return {prefix: node}


def check_fits(ckpt: dict, cfg: DictConfig, where: str, model: torch.nn.Module | None = None) -> None:
    """Raise a UserError if checkpoint `ckpt` was written for another model, dataset,
    optimizer or sparsity config than `cfg`, or its tensors do not fit `model` (which may
    live on the meta device: only names and shapes are compared)."""
    saved, now = ckpt.get("config") or {}, OmegaConf.to_container(cfg, resolve=True)
    for key in _MUST_MATCH:
        a, b = _leaves(_get(saved, key), key), _leaves(_get(now, key), key)
        for leaf in sorted(set(a) | set(b)):
            if leaf not in _MAY_CHANGE and a.get(leaf) != b.get(leaf):
                raise UserError(
                    f"{where} was written with {leaf}={a.get(leaf)}, the config has {leaf}={b.get(leaf)}; "
                    "resume with the same model, dataset, optimizer and sparsity (or start a new run)"
                )
    if model is None:
        return
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in ckpt["model"].items() if torch.is_tensor(v)}
    for k in sorted(set(mine) | set(theirs)):
        if mine.get(k) != theirs.get(k):
            raise UserError(
                f"{where} does not fit this model: {k} is {theirs.get(k, 'missing')} in the checkpoint, "
                f"{mine.get(k, 'missing')} in the model"
            )


def check_resume(cfg: DictConfig, run_dir: Path) -> None:
    """What a run would resume from loads and fits `cfg`: checked before a run directory is
    touched (the tensors are memory-mapped, not read)."""
    from .config import meta_model

    path = resume_path(cfg, run_dir)
    if path is None:
        return
    where = f"resume={cfg.resume}" + (f" ({path})" if cfg.resume == "auto" else "")
    ckpt = load_checkpoint(path, key="resume", mmap=True) if cfg.resume != "auto" else _load_auto(path, where)
    check_fits(ckpt, cfg, where, meta_model(cfg))


def _load_auto(path: Path, where: str) -> dict:
    try:
        return load_checkpoint(path, key="resume", mmap=True)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def restore(run: Run, path: Path) -> None:
    ckpt = load_checkpoint(path, key="resume")
    check_fits(ckpt, run.cfg, f"resume={path}")
    try:
        load_plain_state_dict(run.model, ckpt["model"])
        run.method.load_state_dict({"masks": ckpt["masks"], **ckpt.get("sparsity", {})})
        run.optimizer.load_state_dict(ckpt["optimizer"])
        run.scheduler.load_state_dict(ckpt["scheduler"])
        run.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0][:160]
        raise UserError(f"resume={path} does not fit this model/optimizer: {first}") from None
    run.step = run.saved_step = int(ckpt["step"])
    metrics = ckpt.get("metrics") or {}
    run.best, run.last_eval = metrics.get("best") or {}, metrics.get("last") or {}
    run.skipped_steps = int(metrics.get("skipped_steps", 0))
    run.wall_before = float(metrics.get("wall_time_s", 0.0))


# ------------------------------------------------------------------------- signals
class StopSignals:
    """Signals that end a run early, without losing it.

    SIGINT (Ctrl-C) and SIGTERM (what a cluster sends before it kills a job) ask the loop to
    stop after the current step: it writes last.ckpt, flushes the logs, and the process
    exits with 128 + the signal number (130, 143). A second one exits at once.

    A signal that someone else already handles with a Python function (submitit: SIGUSR2
    checkpoints and requeues the job, SIGTERM is logged and ignored) is not taken over but
    chained: the loop finishes the step, writes last.ckpt, then calls that handler, which
    decides (submitit requeues and exits; a requeued `resume=auto` job continues from the
    checkpoint). SIGUSR1/SIGUSR2 without such a handler, and ignored signals, are left
    alone. Handlers can only be installed from the main thread (elsewhere: no handling).

    DataLoader workers get a Ctrl-C or a cluster's SIGTERM too (the whole process group).
    They are forked with these handlers: there SIGINT is ignored (the main process stops
    after the step and shuts them down) and other signals do what they did before us.
    SIGTERM ends a worker (torch's own handler), which makes torch fail the main process
    wherever it is (SIGCHLD): once a stop is asked for, that failure is logged instead, a
    loader that broke off ends the epoch, and the loop checkpoints the step it has done
    (see `fit`).
    """

    OWN = (signal.SIGINT, signal.SIGTERM)
    CHAINABLE = tuple(getattr(signal, n) for n in ("SIGUSR1", "SIGUSR2") if hasattr(signal, n))

    def __init__(self):
        self.received: int | None = None  # an owned signal: stop after this step
        self.pending: list[int] = []  # chained signals: checkpoint, then call their handler
        self._previous: dict = {}
        self._chained: set[int] = set()
        self._on_child = None  # torch's SIGCHLD handler, wrapped once a stop is asked for
        self._pid = os.getpid()

    @property
    def requested(self) -> bool:
        return self.received is not None or bool(self.pending)

    def __enter__(self):
        self._pid = os.getpid()
        for sig in self.OWN + self.CHAINABLE:
            previous = signal.getsignal(sig)
            foreign = callable(previous) and previous is not signal.default_int_handler
            if previous in (signal.SIG_IGN, None) or (sig not in self.OWN and not foreign):
                continue
            try:
                signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals to whoever runs us
                break
            self._previous[sig] = previous
            if foreign:
                self._chained.add(sig)
        return self

    def _handle(self, signum, frame):
        if os.getpid() != self._pid:  # a forked child (see above)
            if signum != signal.SIGINT:
                signal.signal(signum, self._previous[signum])
                os.kill(os.getpid(), signum)
            return
        self._tolerate_worker_exits()
        name = signal.Signals(signum).name
        if signum in self._chained:
            if signum in self.pending:  # the second one does not wait for the step
                self._previous[signum](signum, frame)
            else:
                self.pending.append(signum)
                log.warning("received %s: writing last.ckpt after this step, then passing it on", name)
            return
        if self.received is not None:
            log.warning("received %s again: exiting now (last.ckpt is from an earlier step)", name)
            raise SystemExit(128 + signum)
        self.received = signum
        log.warning("received %s: stopping after this step and writing last.ckpt (again to stop now)", name)

    def _tolerate_worker_exits(self) -> None:
        child = getattr(signal, "SIGCHLD", None)
        current = signal.getsignal(child) if child else None
        if callable(current) and current != self._worker_exited:
            self._previous.setdefault(child, current)
            self._on_child = current
            signal.signal(child, self._worker_exited)

    def _worker_exited(self, signum, frame):
        try:
            self._on_child(signum, frame)
        except RuntimeError as e:  # torch: "DataLoader worker (pid N) is killed by signal"
            log.warning("%s (after the stop signal)", str(e).strip().splitlines()[0])

    def pass_on(self) -> None:
        """After the checkpoint: call the handlers of chained signals (they may exit)."""
        while self.pending:
            sig = self.pending.pop(0)
            self._previous[sig](sig, None)

    def __exit__(self, *exc):
        if os.getpid() == self._pid:
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


def diverged(run: Run, what: str) -> str:
    """The one-line message for a non-finite loss or gradient at the coming step."""
    if run.saved_step is not None:
        kept = f"the last good checkpoint is {run.ckpt_dir / 'last.ckpt'} (step {run.saved_step})"
    else:
        kept = "no checkpoint was written yet"
    return (
        f"{what} at step {run.step + 1}; stopped, {kept}; lower optimizer.lr, "
        "or set trainer.skip_nonfinite=true to skip such steps"
    )


def grads_finite(params) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    return bool(torch.isfinite(torch.stack([g.norm() for g in grads])).all())


def train_step(run: Run, x: torch.Tensor, y: torch.Tensor, params: list) -> tuple[torch.Tensor, bool, bool]:
    """One optimizer step with the method's hooks in their order. Returns (model output,
    whether the step was finite, whether the masks changed after it)."""
    t, model, method, optimizer = run.cfg.trainer, run.model, run.method, run.optimizer
    method.before_forward(run.step)
    with run.autocast() if run.autocast else torch.enable_grad():
        out = model(x)
        loss = run.task.loss(out, y)
    finite = bool(torch.isfinite(loss))
    if not finite and not t.skip_nonfinite:
        raise RunFailed(diverged(run, f"the loss is {loss.item()}"))
    if finite:
        optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        run.scaler.unscale_(optimizer)
        method.after_backward(run.step)
        if t.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        finite = run.scaler.is_enabled() or grads_finite(params)
        if not finite and not t.skip_nonfinite:
            raise RunFailed(diverged(run, "the gradients are not finite"))
        if finite:
            run.scaler.step(optimizer)  # (fp16: skipped by the scaler itself on inf)
        run.scaler.update()
    if not finite:
        run.skipped_steps += 1  # a skipped step still counts: the data order stays aligned
    run.scheduler.step()
    run.step += 1
    return out, finite, method.after_step(run.step, optimizer)


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
        for x, y in _batches(run.data.train_loader(epoch, cfg.seed, offset), stop):
            x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
            out, finite, changed = train_step(run, x, y, params)
            bar.update(1)
            if changed:
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
                try:
                    val = run_eval(run, logs)
                except Exception:
                    if not stop.requested or logs.metrics.last_step == run.step:
                        raise
                    # Its loader's workers got the signal too; new ones did not.
                    log.warning("evaluation at step %d broke off after the signal; evaluating again", run.step)
                    val = run_eval(run, logs)
                postfix[f"val_{task.metric}"] = f"{val[task.metric]:.1f}"
                log.info("step %d  val loss %.4f  %s %.2f", run.step, val["loss"], task.metric, val[task.metric])
            if (t.checkpoint_every and run.step % t.checkpoint_every == 0) or last or stop.requested:
                save(run, "last.ckpt")
                logs.flush()
                stop.pass_on()  # chained signals (e.g. submitit's requeue) go on from here
            if postfix:
                bar.set_postfix(postfix, refresh=False)
            if stop.received is not None:
                bar.close()
                return "interrupted"
            if last:
                break
        if stop.requested:  # the loader broke off: its workers got the signal too
            save(run, "last.ckpt")
            logs.flush()
            stop.pass_on()
            if stop.received is not None:
                bar.close()
                return "interrupted"
    bar.close()
    return "completed"


def _batches(loader, stop: StopSignals):
    """The loader's batches. If it fails after a stop signal came (DataLoader workers that
    got SIGTERM with the whole job end; the main process notices when it waits for them),
    the batches end there, and the step already done is checkpointed."""
    batches = iter(loader)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as e:
            if not stop.requested:
                raise
            log.warning("the data loader stopped after the signal (%s)", str(e).splitlines()[0] if str(e) else type(e).__name__)
            return
        yield batch


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
    elif cfg.resume != "auto" and holds_run(run_dir):
        raise UserError(f"{run_dir} already holds a run; continue it with resume=auto, or choose another hydra.run.dir")
    start_step = run.step
    # Resuming: keep the logs up to the checkpoint's step. Starting afresh (resume=auto and
    # no checkpoint yet): drop what an attempt killed before its first checkpoint logged.
    logs = RunLogs(run_dir, resume_step=start_step if ckpt is not None else -1, tensorboard=cfg.trainer.tensorboard)
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
        if status == "completed" and logs.sparsity.last_step != run.step:  # (not twice at a refresh)
            logs.log_sparsity(m.report(run.step))
        return_code = 0 if status == "completed" else 128 + stop.received
    except BaseException as e:
        error = str(e).splitlines()[0] if str(e) else type(e).__name__
        status = "interrupted" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "failed"
        if isinstance(e, OSError):  # disk full, a lost mount: the run cannot go on
            kept = f"{run.ckpt_dir / 'last.ckpt'} (step {run.saved_step})" if run.saved_step is not None else "none"
            error = f"I/O error at step {run.step}: {e.strerror or e}" + (f" ({e.filename})" if e.filename else "")
            raise RunFailed(f"{error}; last good checkpoint: {kept}") from None
        raise
    finally:
        summary = summarize(run, status, time.perf_counter() - t0, start_step, error)
        try:
            write_json_atomic(run_dir / "summary.json", summary)
            if status == "completed":
                logs.end_hparams()
            logs.close()
        except OSError as e:
            log.error("could not write %s: %s", run_dir / "summary.json", e.strerror or e)
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
