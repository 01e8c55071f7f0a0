"""topkast train: check every job before Hydra starts, then build the run, restore it when
resuming, run the loop and write the summary. Everything goes to the run directory (Hydra's
output dir): checkpoints/, metrics.jsonl, sparsity.jsonl, tb/, summary.json, train.log.

With several processes (torchrun, the SLURM launcher, or `trainer.devices=N`, which starts
them through torch's elastic launcher), rank 0 checks the job, every rank trains its share of
each global batch, and rank 0 alone writes the run directory.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from .. import config, distributed, launch, spawn
from ..checkpoint import load_checkpoint
from ..distributed import World
from ..errors import RunFailed, UserError
from ..loop import fit
from ..resume import check_fresh, check_resume, resume_path
from ..run import build_run, check_run, kept_torch_settings, restore
from ..run_logs import RunLogs, write_json_atomic
from ..signals import StopSignals
from ..summary import hparams, summarize

log = logging.getLogger("topkast")


def check_job(cfg: DictConfig, run_dir: Path | None, multirun: bool = False) -> None:
    """The pre-flight check of one training job (`cfg` with its `hydra` node): its values,
    the processes it asks for, the run built on the meta device with one batch through it,
    and what its run directory holds (a fresh run must not mix with an old one; a resumed
    one must fit its checkpoint)."""
    job = config.without_hydra(cfg)
    config.validate(job)
    processes = check_processes(job, World.from_env(), multirun) * launcher_ranks(cfg)
    meta = check_run(job, processes)
    if run_dir is None:  # a sweep job whose directory depends on its number
        return
    what, key = ("the sweep", "hydra.sweep.dir") if multirun else ("it", "hydra.run.dir")
    check_fresh(job, run_dir, what, key)
    method = meta.method if meta is not None else config.instantiate(job.sparsity, "sparsity")
    check_resume(job, run_dir, method, *((meta.model, meta.data) if meta is not None else (None, None)))


def launcher_ranks(cfg: DictConfig) -> int:
    """The ranks of each job that a data-parallel launcher (`hydra/launcher=slurm_ddp`) will
    start: nodes x tasks_per_node; 1 for any other launcher."""
    launcher = OmegaConf.select(cfg, "hydra.launcher", default=None)
    if launcher is None or not str(launcher.get("_target_", "")).endswith("DDPLauncher"):
        return 1
    return int(launcher.get("nodes", 1)) * int(launcher.get("tasks_per_node", 1))


def check_processes(cfg: DictConfig, world: World, multirun: bool) -> int:
    """How many processes will train the job: the launcher's world, or `trainer.devices`
    (which must not ask for more devices than this machine has)."""
    devices = cfg.trainer.get("devices", 1)
    if world.active:
        if devices not in (1, world.size):
            raise UserError(
                f"trainer.devices={devices} but the launcher started {world.size} processes; "
                "under torchrun or SLURM the launcher sets the number (drop trainer.devices)"
            )
        return world.size
    if devices == 1:
        return 1
    if multirun:
        raise UserError(
            f"trainer.devices={devices} starts the processes of one `topkast train`; a sweep's jobs are "
            "one process each: use hydra/launcher=slurm_ddp (tasks_per_node) for data-parallel sweep jobs"
        )
    import torch

    gpus = torch.cuda.is_available() and cfg.trainer.device != "cpu"
    present, kind = (torch.cuda.device_count(), "CUDA devices") if gpus else (spawn.cpu_count(), "CPU cores")
    if devices > present:
        raise UserError(f"trainer.devices={devices} but this machine has {present} {kind}")
    return devices


@kept_torch_settings()
def train(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Train as `cfg` says, writing into `run_dir`; returns the summary. Under torchrun or
    the SLURM launcher, as this process's rank. The process-wide torch settings the run sets
    are put back when it ends."""
    world = World.from_env()
    distributed.setup(world, cfg.trainer.timeout_min)
    try:
        return _train(cfg, Path(run_dir), world)
    finally:
        distributed.teardown()


def _train(cfg: DictConfig, run_dir: Path, world: World) -> dict:
    if world.main:
        run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    run = build_run(cfg, run_dir, world=world)
    run.started = t0  # wall time includes building (data generation/loading)
    ckpt = distributed.broadcast(resume_path(cfg, run_dir) if world.main else None, world)
    if ckpt is not None:
        restore(run, load_checkpoint(ckpt, key="resume"), f"resume={ckpt}")
        log.info("resumed from %s at step %d", ckpt, run.step)
    elif world.main:
        check_fresh(cfg, run_dir)
    start_step = run.step
    # Resuming: keep the logs up to the checkpoint's step. Starting afresh (resume=auto and
    # no checkpoint yet): drop what an attempt killed before its first checkpoint logged.
    logs = RunLogs(
        run_dir, resume_step=start_step if ckpt is not None else -1, tensorboard=cfg.trainer.tensorboard, write=world.main
    )
    m = run.method
    log.info(
        "%s: %d sparse layers%s, forward sparsity %.3f, backward sparsity %.3f; %d steps (%.1f epochs) on %s%s",
        m.display_name, len(m.layers), "" if m.structure.unstructured else f" ({m.structure})",
        m.forward_sparsity, m.backward_sparsity,
        run.total_steps, run.total_steps / run.data.steps_per_epoch, run.device,
        f" x {world.size} processes (global batch {run.data.batch_size}, {run.data.batch_size // world.size} per process)"
        if world.active else "",
    )
    if m.layers and m.backend != "masked":
        log.info("sparsity.backend=%s: %s", m.backend, ", ".join(f"{k} {v}" for k, v in m.backends().items()))
        for name, note in m.backend_notes.items():
            log.info("  %s: %s", name, note)
    status, error = "failed", None
    try:
        if ckpt is None:
            logs.log_sparsity(m.report(run.step))
            logs.log_hparams(hparams(cfg, m), [f"val/{run.task.metric}", "val/loss", "train/loss"])
        with StopSignals(repeat_grace_s=2.0 if world.active else 0.0, collective=world.active) as stop:
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
            if world.main:
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
    distributed.barrier(world)  # no rank ends (and makes a launcher stop the others) before rank 0 has written
    if return_code:
        raise SystemExit(return_code)
    return summary


def task(cfg: DictConfig):
    """The Hydra task of `topkast train` and of every `topkast sweep` job."""
    return launch.run_job("train", lambda c: train(c, HydraConfig.get().runtime.output_dir), cfg)


def main(args: list[str]) -> None:
    world = World.from_env()
    if world.active:  # started by torchrun: every rank runs this
        args = _agreed_args(args, world)
        launch.launch("train", task, "topkast train", args)
        return
    jobs = []
    args = launch.preflight("train", args, check_job, jobs)
    devices = jobs[0].trainer.get("devices", 1) if len(jobs) == 1 and not launch.hydra_args(args).multirun else 1
    if devices > 1:
        run_dir = jobs[0].hydra.run.dir  # resolved once here (it may hold the time), for every rank
        raise SystemExit(spawn.run_local(devices, [*args, f"hydra.run.dir={run_dir}"], jobs[0].trainer.get("threads")))
    launch.launch("train", task, "topkast train", args)


def _agreed_args(args: list[str], world: World) -> list[str]:
    """Under torchrun: rank 0 checks the job and fixes its run directory (which may depend on
    the time) for all ranks; a mistake is one line from rank 0, and every rank exits 2."""
    distributed.setup(world)
    outcome = None
    if world.main:
        try:
            jobs = []
            checked = launch.preflight("train", args, check_job, jobs)
            if launch.hydra_args(args).multirun:
                raise UserError("under torchrun, train one job (no --multirun): each rank is a part of it")
            outcome = (checked + [f"hydra.run.dir={jobs[0].hydra.run.dir}"] if jobs else checked, None, 0)
        except UserError as e:
            outcome = (None, str(e), e.exit_code)
        except SystemExit as e:  # the argument parser has said why
            outcome = (None, None, e.code)
    args, message, code = distributed.broadcast(outcome, world)
    if args is None:
        distributed.teardown()
        if world.main and message:
            launch.fail("train", message, code)
        raise SystemExit(code)
    if world.rank and launch.only_prints(launch.hydra_args(args)):
        raise SystemExit(0)  # (help and the like: printed once, by rank 0)
    return args + launch.rank_overrides(world.rank)
