"""topkast train: check every job before Hydra starts, then build the run, restore it when
resuming, run the loop and write the summary. Everything goes to the run directory (Hydra's
output dir): checkpoints/, metrics.jsonl, sparsity.jsonl, tb/, summary.json, train.log.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from .. import config, launch
from ..checkpoint import load_checkpoint
from ..errors import RunFailed
from ..loop import fit
from ..resume import check_fresh, check_resume, resume_path
from ..run import build_run, check_run, restore
from ..run_logs import RunLogs, write_json_atomic
from ..signals import StopSignals
from ..summary import hparams, summarize

log = logging.getLogger("topkast")


def check_job(cfg: DictConfig, run_dir: Path | None, multirun: bool = False) -> None:
    """The pre-flight check of one training job (`cfg` with its `hydra` node): its values,
    the run built on the meta device with one batch through it, and what its run directory
    holds (a fresh run must not mix with an old one; a resumed one must fit its checkpoint)."""
    job = config.without_hydra(cfg)
    config.validate(job)
    meta = check_run(job)
    if run_dir is None:  # a sweep job whose directory depends on its number
        return
    what, key = ("the sweep", "hydra.sweep.dir") if multirun else ("it", "hydra.run.dir")
    check_fresh(job, run_dir, what, key)
    method = meta.method if meta is not None else config.instantiate(job.sparsity, "sparsity")
    check_resume(job, run_dir, method, *((meta.model, meta.data) if meta is not None else (None, None)))


def train(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Train as `cfg` says, writing into `run_dir`; returns the summary."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    run = build_run(cfg, run_dir)
    run.started = t0  # wall time includes building (data generation/loading)
    ckpt = resume_path(cfg, run_dir)
    if ckpt is not None:
        restore(run, load_checkpoint(ckpt, key="resume"), f"resume={ckpt}")
        log.info("resumed from %s at step %d", ckpt, run.step)
    else:
        check_fresh(cfg, run_dir)
    start_step = run.step
    # Resuming: keep the logs up to the checkpoint's step. Starting afresh (resume=auto and
    # no checkpoint yet): drop what an attempt killed before its first checkpoint logged.
    logs = RunLogs(run_dir, resume_step=start_step if ckpt is not None else -1, tensorboard=cfg.trainer.tensorboard)
    m = run.method
    log.info(
        "%s: %d sparse layers, forward sparsity %.3f, backward sparsity %.3f; %d steps (%.1f epochs) on %s",
        m.display_name, len(m.layers), m.forward_sparsity, m.backward_sparsity,
        run.total_steps, run.total_steps / run.data.steps_per_epoch, run.device,
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


def task(cfg: DictConfig):
    """The Hydra task of `topkast train` and of every `topkast sweep` job."""
    return launch.run_job("train", lambda c: train(c, HydraConfig.get().runtime.output_dir), cfg)


def main(args: list[str]) -> None:
    args = launch.preflight("train", args, check_job)
    launch.launch("train", task, "topkast train", args)
