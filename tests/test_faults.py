"""Faults while a run goes: a crash, a full disk or SIGKILL while a checkpoint is written
(the previous one stays intact and loadable), non-finite losses or gradients (stop with
the step named, or skip and count), torn log lines, stale logs of a run that never wrote a
checkpoint, and the resume checks that need no console script.
"""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY, make_config
from topkast_cli.commands import train as train_command
from topkast_cli.launch import preflight
from topkast_cli.data.base import DataModule
from topkast_cli.errors import RunFailed, UserError
from topkast_cli.run_logs import RunLogs, read_jsonl
from topkast_cli.commands.train import train

# TINY: 20 steps, last.ckpt at steps 10 and 20.


def ckpt_step(run: Path, name: str = "last.ckpt") -> int:
    return torch.load(run / "checkpoints" / name, weights_only=True)["step"]


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


# A console run with a fault injected into torch.save at the n-th write of last.ckpt: it
# writes half of the file, then does `action`. Same as the `topkast` script otherwise.
FAULTY_SAVE = """
import errno, io, os, signal, sys
import torch
real_save, writes = torch.save, []
def save(obj, f, *args, **kwargs):
    if str(getattr(f, "name", "")).endswith(".last.ckpt.tmp"):
        writes.append(1)
        if len(writes) == {n}:
            buf = io.BytesIO()
            real_save(obj, buf)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            {action}
    return real_save(obj, f, *args, **kwargs)
torch.save = save
sys.argv[0] = "topkast"
from topkast_cli.cli import main
sys.exit(main())
"""
DISK_FULL = "raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))"
KILL = "os.kill(os.getpid(), signal.SIGKILL)"


def run_with_faulty_save(tmp_path: Path, action: str, n: int = 2) -> subprocess.CompletedProcess:
    code = FAULTY_SAVE.format(n=n, action=action)
    args = ["train", *TINY, f"hydra.run.dir={tmp_path / 'run'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)


def test_disk_full_while_saving_exits_1_with_the_previous_checkpoint_intact(tmp_path):
    proc = run_with_faulty_save(tmp_path, DISK_FULL)
    run = tmp_path / "run"
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "No space left on device" in lines[0] and "previous last.ckpt is intact" in lines[0]
    assert str(run / "checkpoints" / "last.ckpt") in lines[0]
    assert ckpt_step(run) == 10
    assert not (run / "checkpoints" / ".last.ckpt.tmp").exists()
    assert summary(run)["status"] == "failed"


def test_sigkill_while_saving_leaves_the_previous_checkpoint_and_resume_continues(tmp_path):
    proc = run_with_faulty_save(tmp_path, KILL)
    run = tmp_path / "run"
    assert proc.returncode == -signal.SIGKILL
    assert (run / "checkpoints" / ".last.ckpt.tmp").exists(), "the kill did not come during the write"
    assert ckpt_step(run) == 10  # the complete previous checkpoint, loadable
    result = train(make_config([*TINY, "resume=auto"]), run)
    assert result["status"] == "completed" and ckpt_step(run) == 20


@pytest.mark.parametrize("error", [RuntimeError("crash inside torch.save"), OSError(errno.ENOSPC, "No space left on device")])
def test_failed_save_in_process_keeps_the_previous_checkpoint(tmp_path, monkeypatch, error):
    real_save, writes = torch.save, []

    def save(obj, f, *args, **kwargs):
        if str(getattr(f, "name", "")).endswith(".last.ckpt.tmp"):
            writes.append(1)
            if len(writes) == 2:
                buf = io.BytesIO()
                real_save(obj, buf)
                f.write(buf.getvalue()[:1000])
                raise error
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    expected = RunFailed if isinstance(error, OSError) else RuntimeError
    with pytest.raises(expected) as failed:
        train(make_config(TINY), tmp_path)
    if expected is RunFailed:
        assert failed.value.exit_code == 1 and "at step 20" in str(failed.value)
    monkeypatch.undo()
    assert ckpt_step(tmp_path) == 10
    assert not (tmp_path / "checkpoints" / ".last.ckpt.tmp").exists()


def test_failed_log_write_ends_the_run_naming_the_last_checkpoint(tmp_path, monkeypatch):
    from topkast_cli.run_logs import JsonlLog

    real_write = JsonlLog.write

    def write(self, record):
        if record.get("step") == 20 and self.path.name == "metrics.jsonl":
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        real_write(self, record)

    monkeypatch.setattr(JsonlLog, "write", write)
    with pytest.raises(RunFailed) as failed:
        train(make_config(TINY), tmp_path)
    message = str(failed.value)
    assert failed.value.exit_code == 1
    assert "No space left on device" in message and "metrics.jsonl" in message and "(step 10)" in message, message
    assert ckpt_step(tmp_path) == 10


# ------------------------------------------------------------------- non-finite
def inject(monkeypatch, loss_at=(), grad_at=()):
    """NaN loss at the given optimizer steps (1-based), inf gradients at others; returns
    the parameters seen before and after each injected step."""
    from topkast_cli.sparsity import TopKAST
    from topkast_cli.tasks import Classification

    seen = {"step": 0, "before": {}, "after": {}}
    real_loss, real_backward, real_after = Classification.loss, TopKAST.after_backward, TopKAST.after_step

    def loss(self, output, target):
        value = real_loss(self, output, target)
        if torch.is_grad_enabled() and output.requires_grad:  # a training step
            seen["step"] += 1
            if seen["step"] in loss_at:
                return value * float("nan")
        return value

    def after_backward(self, step):
        real_backward(self, step)
        if step + 1 in grad_at:
            self.layers[0].theta.grad.fill_(float("inf"))

    def after_step(self, step, optimizer=None):
        if step in (*loss_at, *grad_at):
            seen["after"][step] = [p.detach().clone() for p in optimizer.param_groups[-1]["params"]]
        return real_after(self, step, optimizer)

    def before_forward(self, step):
        if step + 1 in (*loss_at, *grad_at):
            seen["before"][step + 1] = [l.theta.detach().clone() for l in self.layers]

    monkeypatch.setattr(Classification, "loss", loss)
    monkeypatch.setattr(TopKAST, "after_backward", after_backward)
    monkeypatch.setattr(TopKAST, "after_step", after_step)
    monkeypatch.setattr(TopKAST, "before_forward", before_forward)
    return seen


@pytest.mark.parametrize("what", ["loss", "gradients"])
def test_nonfinite_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, what):
    inject(monkeypatch, **({"loss_at": (15,)} if what == "loss" else {"grad_at": (15,)}))
    with pytest.raises(RunFailed) as failed:
        train(make_config(TINY), tmp_path)
    message = str(failed.value)
    assert failed.value.exit_code == 1
    assert "at step 15" in message and "(step 10)" in message and "skip_nonfinite" in message, message
    assert ("loss is nan" if what == "loss" else "gradients are not finite") in message
    assert ckpt_step(tmp_path) == 10
    assert summary(tmp_path)["status"] == "failed" and "step 15" in summary(tmp_path)["error"]


def test_skip_nonfinite_skips_and_counts(tmp_path, monkeypatch):
    seen = inject(monkeypatch, loss_at=(13,), grad_at=(17,))
    result = train(make_config([*TINY, "trainer.skip_nonfinite=true"]), tmp_path)
    assert result["status"] == "completed" and result["skipped_steps"] == 2
    assert summary(tmp_path)["skipped_steps"] == 2
    for step in (13, 17):  # a skipped step leaves the sparse weights exactly as they were
        for before, after in zip(seen["before"][step], seen["after"][step]):
            assert torch.equal(before, after), f"step {step} changed the weights"
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values())


@pytest.mark.slow  # the in-process tests above cover it; this adds the exit code and stderr
def test_diverging_run_through_the_console_script(tmp_path):
    """optimizer.lr=1e30: step 1 makes the weights huge, step 2's loss is NaN."""
    from conftest import run_topkast

    run = tmp_path / "run"
    proc = run_topkast(["train", *TINY, "optimizer.lr=1e30", "trainer.checkpoint_every=1", f"hydra.run.dir={run}"], tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "the loss is nan at step 2" in lines[0] and "(step 1)" in lines[0], proc.stderr
    assert ckpt_step(run) == 1


# ---------------------------------------------------------------------- logs
def test_torn_last_line_is_skipped_and_dropped_on_resume(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 10, "loss": 1.0}\n{"step": 20, "loss": 0.5}\n{"step": 30, "lo')
    assert [r["step"] for r in read_jsonl(log)] == [10, 20]
    logs = RunLogs(tmp_path, resume_step=20, tensorboard=False)
    logs.log_metrics(21, "val", {"loss": 0.4})
    logs.close()
    assert [r["step"] for r in read_jsonl(log)] == [10, 20, 21]
    assert log.read_text().count("\n") == 3  # no torn fragment left in the file


def test_resume_auto_without_a_checkpoint_starts_over_with_clean_logs(tmp_path):
    """A run killed before its first checkpoint left logs: resume=auto starts from scratch
    and its logs are those of a fresh run, without the stale records."""
    fresh = tmp_path / "fresh"
    train(make_config(TINY), fresh)
    stale = tmp_path / "stale"
    train(make_config([*TINY, "trainer.max_steps=9", "trainer.checkpoint_every=null", "trainer.eval_every=3"]), stale)
    for p in (stale / "checkpoints").iterdir():
        p.unlink()  # as if killed before the first checkpoint
    train(make_config([*TINY, "resume=auto"]), stale)
    for log in ("metrics.jsonl", "sparsity.jsonl"):
        assert read_jsonl(stale / log) == read_jsonl(fresh / log), log


def test_fresh_run_refuses_a_directory_with_logs_of_another_run(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 10, "split": "val", "loss": 1.0}\n')
    with pytest.raises(UserError, match="already holds a run"):
        train(make_config(TINY), tmp_path)
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1


# -------------------------------------------------------- checks before a run
@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("finished")
    train(make_config(TINY), run)
    return run


def preflight_error(args) -> str:
    with pytest.raises(UserError) as e:
        preflight("train", [*TINY, *args], train_command.check_job)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_resume_from_a_torch_file_that_is_no_topkast_checkpoint(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    message = preflight_error([f"resume={tmp_path / 'foreign.pt'}", f"hydra.run.dir={tmp_path / 'new'}"])
    assert "not a topkast checkpoint" in message and "format_version" in message


def test_resume_from_a_checkpoint_whose_tensors_do_not_fit(tmp_path, finished):
    state = torch.load(finished / "checkpoints" / "last.ckpt", weights_only=True)
    state["model"]["classifier.weight"] = torch.zeros(10, 3)
    torch.save(state, tmp_path / "other.ckpt")
    message = preflight_error([f"resume={tmp_path / 'other.ckpt'}", f"hydra.run.dir={tmp_path / 'new'}"])
    assert "does not fit" in message and "classifier.weight" in message and "(10, 3)" in message


def test_resume_with_another_sparsity_is_refused(tmp_path, finished):
    message = preflight_error([f"resume={finished / 'checkpoints' / 'last.ckpt'}", "sparsity.forward=0.8"])
    assert "sparsity.forward=0.9" in message and "sparsity.forward=0.8" in message


def test_resume_may_change_the_budget_and_refresh_interval(finished):
    preflight(
        "train",
        [*TINY, f"resume={finished / 'checkpoints' / 'last.ckpt'}", "trainer.max_steps=40", "sparsity.refresh_interval=7"],
        train_command.check_job,
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="as root, permission bits do not stop writes")
def test_read_only_output_directory(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        message = preflight_error([f"hydra.run.dir={locked / 'run'}"])
        assert "hydra.run.dir=" in message and "not writable" in message
    finally:
        locked.chmod(0o700)


class FolderData(DataModule):
    def __init__(self, root, download=False, **loader):
        super().__init__(**loader)
        self.root, self.download = root, download


def test_missing_data_root_is_found_before_loading(tmp_path):
    with pytest.raises(UserError, match="dataset.root=.*does not exist.*dataset.download=true"):
        FolderData(str(tmp_path / "nope")).check()
    with pytest.raises(UserError, match="is not a directory"):
        (tmp_path / "file").write_text("x")
        FolderData(str(tmp_path / "file")).check()
    FolderData(str(tmp_path / "nope"), download=True).check()  # it will be downloaded
    FolderData(str(tmp_path)).check()
