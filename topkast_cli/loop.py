"""The training loop: one optimizer step with the method's hooks (`train_step`), and the flat
loop around it (`fit`) that logs, evaluates and checkpoints at the configured intervals."""

from __future__ import annotations

import logging
import time

import torch
from tqdm.auto import tqdm

from . import distributed
from .checkpoint import save_run
from .errors import RunFailed
from .health import CollapseWatch
from .run import Run
from .run_logs import RunLogs
from .signals import StopSignals
from .tasks import accumulate, evaluate

log = logging.getLogger("topkast")


def run_eval(run: Run, logs: RunLogs) -> dict:
    """Evaluate on the held-out split (each rank its share, the sums added), log, and keep
    best.ckpt."""
    reduce = lambda sums: distributed.sum_metrics(sums, run.world)  # noqa: E731
    metrics = evaluate(run.model, run.data.eval_loader("val"), run.task, run.device, run.autocast, reduce=reduce)
    logs.log_metrics(run.step, "val", metrics)
    run.last_eval = {"step": run.step, **metrics}
    key = run.task.metric
    better = (lambda a, b: a > b) if run.task.higher_is_better else (lambda a, b: a < b)
    if not run.best or better(metrics[key], run.best[key]):
        run.best = {"step": run.step, **metrics}
        save_run(run, "best.ckpt")
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
    t, method, optimizer = run.cfg.trainer, run.method, run.optimizer
    method.before_forward(run.step)
    with run.autocast() if run.autocast else torch.enable_grad():
        out = run.step_model(x)
        loss = run.task.loss(out, y)
    # Every rank takes the same branch (DDP's backward is collective): a loss that is not
    # finite on one rank's share is not finite for the global batch.
    finite = distributed.all_true(bool(torch.isfinite(loss)), run.world)
    if not finite and not t.skip_nonfinite:
        raise RunFailed(diverged(run, f"the loss is {loss.item()}"))
    if finite:
        optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        distributed.average_gradients(run.unsynced, run.world)
        run.scaler.unscale_(optimizer)
        method.after_backward(run.step)
        if t.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        finite = run.scaler.is_enabled() or grads_finite(params)
        if not finite and not t.skip_nonfinite:
            raise RunFailed(diverged(run, "the gradients are not finite"))
        if finite:
            method.before_step(run.step, optimizer)
            run.scaler.step(optimizer)  # (fp16: skipped by the scaler itself on inf)
        run.scaler.update()
    if not finite:
        run.skipped_steps += 1  # a skipped step still counts: the data order stays aligned
    run.scheduler.step()
    run.step += 1
    # The output goes back without its graph: the graph is freed here, not at the next step
    # (less memory, and a mask update that resizes what the sparse backend trains must not
    # meet a graph still holding the old size).
    out = out.detach()
    return out, finite, method.after_step(run.step, optimizer)


def fit(run: Run, logs: RunLogs, stop: StopSignals) -> str:
    """The training loop. Returns "completed" or "interrupted"."""
    cfg, t, world = run.cfg, run.cfg.trainer, run.world
    model, method, optimizer, task = run.model, run.method, run.optimizer, run.task
    params = [p for g in optimizer.param_groups for p in g["params"]]
    spe = run.data.steps_per_epoch
    running, seen, tick = None, 0, time.perf_counter()
    postfix = {"density": f"{method.report(run.step)['forward_density']:.3f}"}
    bar = tqdm(total=run.total_steps, initial=run.step, desc="train", unit="step",
               disable=not (t.progress and world.main), dynamic_ncols=True)
    health = CollapseWatch(method, t.get("collapse_window"), t.get("collapse_stop", False), t.log_every,
                           all_max=(lambda flags: distributed.all_max(flags, world)) if world.active else None)
    model.train()
    while run.step < run.total_steps:
        epoch, offset = divmod(run.step, spe)
        for x, y in _batches(run.data.train_loader(epoch, cfg.seed, offset), stop):
            x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
            if run.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            health.before_step(run.step)
            out, finite, changed = train_step(run, x, y, params)
            if world.active:  # every rank stops after the same step
                stop.agree(lambda flags: distributed.all_max(flags, world))
            bar.update(1)
            if changed:
                if world.active:  # (digests are only worth computing to compare them)
                    distributed.check_same(method.mask_digests(), world, run.step)
                report = method.report(run.step)
                logs.log_sparsity(report)
                postfix["density"] = f"{report['forward_density']:.3f}"
            if finite:
                running = accumulate(running, task.batch_sums(out, y))  # (out comes detached)
            seen += y.shape[0] * world.size

            last = run.step >= run.total_steps
            if run.step % t.log_every == 0 or last:
                now = time.perf_counter()
                running = distributed.sum_metrics(running, world)  # (the same finite steps on every rank)
                train = task.finalize(running) if running else {"loss": float("nan"), task.metric: float("nan")}
                train["lr"] = optimizer.param_groups[0]["lr"]
                train["samples_per_sec"] = seen / max(now - tick, 1e-9)
                reg = method.regularization()
                if reg is not None:
                    train["regularization"] = reg
                if run.skipped_steps:
                    train["skipped_steps"] = run.skipped_steps
                logs.scalars("train", train, run.step)
                if logs.tb is not None:
                    logs.histograms("sparsity/magnitude", method.magnitudes(), run.step)
                health.check(run.step, train["loss"], out)
                running, seen, tick = None, 0, now
                postfix.update(loss=f"{train['loss']:.3f}", **{task.metric: f"{train[task.metric]:.1f}"})
            if (t.eval_every and run.step % t.eval_every == 0) or last:
                try:
                    val = run_eval(run, logs)
                except Exception:
                    if not stop.signalled or logs.metrics.last_step == run.step:
                        raise
                    # Its loader's workers got the signal too; new ones did not.
                    log.warning("evaluation at step %d broke off after the signal; evaluating again", run.step)
                    val = run_eval(run, logs)
                postfix[f"val_{task.metric}"] = f"{val[task.metric]:.1f}"
                log.info("step %d  val loss %.4f  %s %.2f", run.step, val["loss"], task.metric, val[task.metric])
            if (t.checkpoint_every and run.step % t.checkpoint_every == 0) or last or stop.requested:
                checkpoint(run, logs, stop)
            if postfix:
                bar.set_postfix(postfix, refresh=False)
            if stop.received is not None or last:
                break
        else:
            if stop.signalled:  # the loader broke off: its workers got the signal too
                checkpoint(run, logs, stop)
        if stop.received is not None:
            break
    health.close()
    bar.close()
    return "interrupted" if stop.received is not None else "completed"


def checkpoint(run: Run, logs: RunLogs, stop: StopSignals) -> None:
    """last.ckpt and the logs on disk (rank 0; the others wait until it is written, so none
    exits before it); then chained signals (e.g. submitit's requeue) go on."""
    save_run(run, "last.ckpt")
    logs.flush(run.step)
    distributed.barrier(run.world)
    stop.pass_on()


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
            if not stop.signalled:
                raise
            log.warning("the data loader stopped after the signal (%s)", str(e).splitlines()[0] if str(e) else type(e).__name__)
            return
        yield batch
