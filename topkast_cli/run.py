"""One path from a composed config to a run, and from a checkpoint into it.

`build_run` builds everything a run works with (data, model, sparsity method, optimizer,
scheduler, task), on the configured device or, for the pre-flight check, on the meta device
(shapes only: nothing is loaded, allocated or initialised). `restore` loads a checkpoint into
a built run. Train, eval and the pre-flight check all go through these two functions; the
model constructor is called in `build_model` and nowhere else.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from . import config, distributed
from .checkpoint import set_rng_state
from .distributed import World
from .errors import UserError
from .resume import check_fits
from .sparsity import SparsityMethod, load_plain_state_dict
from .tasks import build_task


# --------------------------------------------------------------------------- pieces
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


def torch_settings() -> dict:
    """The process-wide torch settings: those a run sets (`trainer.threads`,
    `trainer.deterministic`, cuDNN's algorithm choice) and the others code may change."""
    return {
        "num_threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cudnn.benchmark": torch.backends.cudnn.benchmark,
        "cudnn.deterministic": torch.backends.cudnn.deterministic,
        "default_dtype": torch.get_default_dtype(),
    }


def set_torch_settings(settings: dict) -> None:
    torch.set_num_threads(settings["num_threads"])
    torch.use_deterministic_algorithms(settings["deterministic_algorithms"], warn_only=settings["deterministic_warn_only"])
    torch.backends.cudnn.benchmark = settings["cudnn.benchmark"]
    torch.backends.cudnn.deterministic = settings["cudnn.deterministic"]
    torch.set_default_dtype(settings["default_dtype"])


@contextlib.contextmanager
def kept_torch_settings():
    """Puts back the process-wide torch settings afterwards: a run sets them for itself, and a
    caller that runs in-process (a test, a benchmark's worker) keeps its own. (Also a decorator.)"""
    before = torch_settings()
    try:
        yield
    finally:
        set_torch_settings(before)


def seed_everything(seed: int, deterministic: bool) -> None:
    """The same seed on every rank: the ranks start from the same θ and masks, and draw the
    same random masks later (static, SET) without exchanging them."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    # cuDNN picks the fastest convolution algorithm for each shape (nondeterministically).
    torch.backends.cudnn.benchmark = not deterministic


def autocast_factory(device: torch.device, precision: str):
    """A no-argument context factory for mixed precision, or None for fp32."""
    precision = str(precision)
    if precision == "32":
        return None
    if precision == "fp16" and device.type != "cuda":
        raise UserError("trainer.precision=fp16 needs a CUDA device; use bf16 on the CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)


def build_optimizer(make_optimizer, model: torch.nn.Module, method: SparsityMethod, name: str = "optimizer") -> torch.optim.Optimizer:
    """Sparse weights get no ordinary weight decay: the method's regulariser replaces it, and
    decay would move frozen entries outside the backward set. For a sparse layer the optimizer
    trains what the method names (θ, or on the sparse backend B's values, θ then needing no
    gradient), so its state exists only for what is trained. A sparse group with an `lr_scale`
    (`sparsity.lr_scale`) gets the configured lr times it; schedulers then scale every group's
    lr by the same factor, so the ratio holds over the run."""
    sparse_ids = {id(p) for p in method.sparse_parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) not in sparse_ids]}, *method.parameter_groups()]
    try:
        optimizer = make_optimizer(groups)
    except (TypeError, ValueError) as e:  # torch's own argument checks (e.g. nesterov without momentum)
        raise UserError(f"{name}: {e}") from None
    for group in optimizer.param_groups:
        if "lr_scale" in group:
            group["lr"] = group["lr"] * group["lr_scale"]  # a new object: groups may share an lr tensor
    return optimizer


def build_model(cfg: DictConfig, data, meta: bool = False) -> torch.nn.Module:
    """The model `cfg.model` names, sized by what the dataset says it needs
    (`data.model_kwargs`: `num_classes` and `input_shape` for classification, `vocab_size` and
    `context` for text). On the meta device when `meta` (then any failure but a missing meta
    kernel is the user's)."""
    kwargs = data.model_kwargs
    with torch.device("meta") if meta else contextlib.nullcontext(), warnings.catch_warnings():
        if meta:
            warnings.simplefilter("ignore")  # e.g. "zero-element tensors": the checks say it better
        try:
            return config.instantiate(cfg.model, "model", **kwargs)
        except UserError as e:
            if "unexpected keyword argument" in str(e):  # e.g. a classifier on a text dataset
                raise UserError(
                    f"model ({_target(cfg.model)}) does not fit {_data_name(cfg, data)}: the dataset gives "
                    f"{', '.join(kwargs)}; {_first(e)}"
                ) from None
            raise
        except NotImplementedError:
            raise
        except Exception as e:  # on meta: e.g. a negative size from an input too small for the model
            if not meta:
                raise
            raise UserError(f"model ({_target(cfg.model)}) cannot be built for {_data_name(cfg, data)}: {_first(e)}") from None


@dataclass
class Run:
    """Everything the loop works with."""

    cfg: DictConfig
    run_dir: Path | None
    device: torch.device
    data: object
    model: torch.nn.Module
    method: SparsityMethod
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler | None
    task: object
    autocast: object
    total_steps: int
    world: World = field(default_factory=World)
    # What a training step calls: the model, or DDP around it (several ranks), compiled
    # when trainer.compile is on.
    step_model: torch.nn.Module | None = None
    # Trained tensors DDP does not see (the sparse backend's values): averaged by hand.
    unsynced: list = field(default_factory=list)
    channels_last: bool = False
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


# ------------------------------------------------------------------------- building
def build_run(cfg: DictConfig, run_dir: Path | None = None, meta: bool = False, world: World = World()) -> Run | None:
    """Build the run `cfg` describes, as rank `world.rank` of `world.size` processes (its
    device, its share of the data, DDP around the model). `meta=True` builds it on the meta
    device without loading data: the method is planned (layers chosen and sized) but not
    attached, since masks need values; None when the dataset cannot tell its sample shape
    before loading."""
    t = cfg.trainer
    data = config.instantiate(cfg.dataset, "dataset")
    if meta:
        data.check()
        data.shard(0, world.size)  # a global batch the processes cannot share
        if data.model_kwargs is None:
            return None
        device, total_steps = torch.device("meta"), t.max_steps or 1
    else:
        if t.get("threads"):
            torch.set_num_threads(t.threads)
        device = distributed.device_for(world, t.device) if world.active else resolve_device(t.device)
        data = data.setup().shard(world.rank, world.size)
        data.pin_memory = device.type == "cuda"
        seed_everything(cfg.seed, t.deterministic)  # after data: generators may reseed
        total_steps = config.run_length(t, data.steps_per_epoch)
    model = build_model(cfg, data, meta)
    method = config.instantiate(cfg.sparsity, "sparsity")
    if meta:
        if method.forward_sparsity > 0:
            method.plan(model)  # dense-layer patterns that match nothing, layers left with no weight
    else:
        model = model.to(device)
        example = _example(data, device) if getattr(method, "backend", "masked") == "auto" else None
        method.attach(model, total_steps=total_steps, example=example)
    optimizer = build_optimizer(
        config.instantiate(cfg.optimizer, "optimizer"), model, method, f"optimizer ({cfg.optimizer._target_})"
    )
    scheduler = config.instantiate(cfg.scheduler, "scheduler")(optimizer, total_steps=total_steps)
    autocast = scaler = None
    if not meta:
        autocast = autocast_factory(device, t.precision)
        scaler = torch.amp.GradScaler(device.type, enabled=str(t.precision) == "fp16")
    task = build_task(data.task, label_smoothing=t.label_smoothing)
    run = Run(cfg, run_dir, device, data, model, method, optimizer, scheduler, scaler, task, autocast, total_steps, world)
    if not meta:
        _prepare_steps(run)
    return run


def _prepare_steps(run: Run) -> None:
    """What the training step calls: channels-last memory, DDP, torch.compile, in this order
    (DDP wraps the model as it will compute; compile sees DDP and splits its graph at the
    gradient buckets)."""
    t, model = run.cfg.trainer, run.model
    run.channels_last = bool(t.get("channels_last")) and any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    if run.channels_last:
        model.to(memory_format=torch.channels_last)
    run.step_model = distributed.wrap(model, run.world, run.device)
    if run.world.active:
        seen = {id(p) for p in model.parameters()}
        run.unsynced = [p for p in run.method.sparse_parameters() if id(p) not in seen]
    if t.get("compile"):
        run.step_model = torch.compile(run.step_model)


def check_run(cfg: DictConfig, processes: int = 1) -> Run | None:
    """The pre-flight check of a training config for `processes` ranks: build the run on the
    meta device and push one batch of the dataset's shape through model and loss, so a model
    that does not fit the data (or a global batch the ranks cannot share) is one line before
    any work. Returns the meta run (None: see `build_run`)."""
    run = build_run(cfg, meta=True, world=World(size=processes))
    if run is None:
        return None
    x, y = run.data.example_batch(2, run.device)
    try:
        run.task.loss(run.model(x), y)
    except NotImplementedError:  # an operation without a meta kernel: the real run will tell
        pass
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        raise UserError(
            f"model ({_target(cfg.model)}) does not fit {_data_name(cfg, run.data)}: {_first(e)}"
        ) from None
    return run


def _example(data, device: torch.device) -> torch.Tensor:
    """A training batch's input with values that any model takes (normal for float inputs, 0 for
    token ids), drawn from its own generator: for `sparsity.backend=auto` to time layers on."""
    x = data.example_batch(data.batch_size, device)[0]
    if not x.is_floating_point():
        return torch.zeros_like(x)
    return torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).to(x)


def _target(node) -> str:
    return str(OmegaConf.select(node, "_target_", default="?")).rsplit(".", 1)[-1]


def _data_name(cfg: DictConfig, data) -> str:
    return f"dataset {_target(cfg.dataset)} ({data.describe()})"


def _first(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


# ------------------------------------------------------------------------ restoring
def restore(run: Run, state: dict, where: str, training: bool = True) -> None:
    """Load checkpoint `state` (from `checkpoint.load_checkpoint`) into a built run: θ and the
    masks, and for `training` also the optimizer, scheduler, scaler, RNG, step and metrics
    (after checking the checkpoint was written for this config). Every mismatch is one
    UserError naming `where`."""
    if training:
        check_fits(state, run.cfg, where, run.method)
    run.data.check_state(state.get("data"), where)
    try:
        load_plain_state_dict(run.model, state["model"])
        run.method.load_state_dict({"masks": state["masks"], **(state.get("sparsity") or {})})
        if training:
            run.method.load_optimizer_state_dict(run.optimizer, state["optimizer"])
            run.scheduler.load_state_dict(state["scheduler"])
            run.scaler.load_state_dict(state["scaler"])
            set_rng_state(state["rng"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        what = "this model/optimizer" if training else "the model rebuilt from its config"
        raise UserError(f"{where} does not fit {what}: {_first(e)[:160]}") from None
    run.step = int(state["step"])
    metrics = state.get("metrics") or {}
    run.best, run.last_eval = metrics.get("best") or {}, metrics.get("last") or {}
    if training:
        run.saved_step = run.step
        run.skipped_steps = int(metrics.get("skipped_steps", 0))
        run.wall_before = float(metrics.get("wall_time_s", 0.0))
