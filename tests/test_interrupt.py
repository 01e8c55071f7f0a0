"""Interruptions: SIGTERM/SIGINT finish the step and write last.ckpt; SIGKILL at any moment
loses nothing but the steps since the last checkpoint; resuming (resume=PATH or
resume=auto) ends in exactly the state of an uninterrupted run (deterministic, CPU):
parameters, masks, metrics.jsonl, sparsity.jsonl, and TensorBoard scalars with no
duplicate or out-of-order points. Signals someone else handles (submitit) are chained.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import default_signals, make_config, topkast_script
from topkast_cli.run_logs import read_jsonl
from topkast_cli.commands.train import train
from topkast_cli.signals import StopSignals

# Every test here starts from Python's own SIGINT/SIGTERM handlers, however pytest was started
# (with SIGINT ignored in a background job or some CI runners, the trainer leaves it alone).
pytestmark = pytest.mark.usefixtures("default_signal_handlers")

STEPS = 100
ARGS = [
    f"trainer.max_steps={STEPS}",
    "trainer.eval_every=10",
    "trainer.log_every=5",
    "trainer.checkpoint_every=10",
    "trainer.progress=false",
    "trainer.deterministic=true",
    "trainer.device=cpu",
    "dataset.num_samples=1000",
    "sparsity.refresh_interval=5",
]


# ----------------------------------------------------------------------- helpers
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread here and in the console runs: same arithmetic in both, and on a
    busy 2-core machine several times faster than two threads contending."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def train_in_process(overrides, run_dir):
    return train(make_config(overrides), run_dir)  # (which puts back the deterministic switch)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The same run, never interrupted."""
    run = tmp_path_factory.mktemp("reference")
    train_in_process(ARGS, run)
    return run


def spawn(args, cwd: Path, name: str, new_session: bool = False) -> subprocess.Popen:
    """Start the console script; its output goes to files under cwd. `new_session`: in a
    process group of its own (to signal it with its DataLoader workers, as a terminal or
    a cluster does)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    out = (cwd / f"{name}.out").open("w")
    err = (cwd / f"{name}.err").open("w")
    return subprocess.Popen(
        [topkast_script(), *args], cwd=cwd, stdout=out, stderr=err, env=env, start_new_session=new_session,
        preexec_fn=default_signals,  # SIGINT as a terminal leaves it, even if pytest runs with it ignored
    )


def wait_for(condition, proc: subprocess.Popen | None = None, timeout: float = 300.0) -> bool:
    """Poll `condition()` until true; False if the process ended first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        if proc is not None and proc.poll() is not None:
            return condition()
        time.sleep(0.01)
    raise TimeoutError("condition not reached")


def evaluated_step(run: Path) -> int:
    steps = [r["step"] for r in read_jsonl(run / "metrics.jsonl")]
    return max(steps, default=-1)


def ckpt(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)


def tb_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard shows (its own purge of restarted sessions applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def assert_same_run(run: Path, ref: Path, steps: int = STEPS) -> None:
    a, b = ckpt(run), ckpt(ref)
    assert a["step"] == b["step"] == steps
    assert a["model"].keys() == b["model"].keys()
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"parameter {k} differs"
    assert a["masks"].keys() == b["masks"].keys() and a["masks"]
    for k in b["masks"]:
        for which in ("forward", "backward"):
            assert torch.equal(a["masks"][k][which], b["masks"][k][which]), f"{which} mask of {k} differs"
    for log in ("metrics.jsonl", "sparsity.jsonl"):
        got, want = read_jsonl(run / log), read_jsonl(ref / log)
        steps = [r["step"] for r in got]
        assert steps == sorted(set(steps)), f"{log}: duplicate or out-of-order steps {steps}"
        assert got == want, f"{log} differs from the uninterrupted run"
    got, want = tb_scalars(run), tb_scalars(ref)
    assert got.keys() == want.keys()
    for tag, points in got.items():
        steps = [s for s, _ in points]
        assert steps == sorted(set(steps)), f"TensorBoard {tag}: duplicate or out-of-order steps {steps}"
        assert steps == [s for s, _ in want[tag]], f"TensorBoard {tag}: steps differ"
        if tag.startswith(("val/", "sparsity/")):  # (train/ averages restart at a resume)
            assert points == want[tag], f"TensorBoard {tag}: values differ"


# --------------------------------------------------------------- console script
def test_kill_then_sigterm_then_resume_match_an_uninterrupted_run(tmp_path, reference):
    """SIGKILL after a checkpoint, `resume=auto` in the same directory; then SIGTERM in the
    middle of a checkpoint interval: exit 143 and last.ckpt at the step reached; then
    `resume=PATH` alone (the run's own overrides and directory are reused) to the end."""
    run = tmp_path / "run"
    args = ["train", *ARGS, f"hydra.run.dir={run}", "resume=auto"]

    proc = spawn(args, tmp_path, "first")
    assert wait_for(lambda: evaluated_step(run) >= 20, proc), "the run ended before it could be killed"
    time.sleep(random.Random(0).uniform(0, 0.2))
    proc.kill()
    proc.wait()
    killed_at = ckpt(run)["step"]
    assert killed_at >= 20

    proc = spawn(args, tmp_path, "second")
    assert wait_for(lambda: evaluated_step(run) >= killed_at + 20, proc), "the run ended before SIGTERM"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 128 + signal.SIGTERM
    err = (tmp_path / "second.err").read_text()
    assert "Traceback" not in err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    stopped = summary["step"]
    assert killed_at + 20 <= stopped < STEPS
    assert ckpt(run)["step"] == stopped, "last.ckpt is not at the step reached"
    assert evaluated_step(run) <= stopped
    assert max(s for s, _ in tb_scalars(run)["val/loss"]) == evaluated_step(run), "TensorBoard not flushed"

    proc = spawn(["train", f"resume={run / 'checkpoints' / 'last.ckpt'}"], tmp_path, "third")
    assert proc.wait(timeout=600) == 0, (tmp_path / "third.err").read_text()
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    assert_same_run(run, reference)


@pytest.mark.parametrize(
    "signum", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)], ids=["SIGTERM", "SIGINT"]
)
def test_signal_to_the_process_group_with_dataloader_workers(tmp_path, signum):
    """A cluster's SIGTERM (or a terminal's Ctrl-C) reaches the DataLoader workers too."""
    run = tmp_path / "run"
    proc = spawn(["train", *ARGS, "dataset.num_workers=2", f"hydra.run.dir={run}"], tmp_path, "group", new_session=True)
    assert wait_for(lambda: evaluated_step(run) >= 10, proc), "the run ended before the signal"
    os.killpg(proc.pid, signum)
    assert proc.wait(timeout=300) == 128 + signum, (tmp_path / "group.err").read_text()
    assert "Traceback" not in (tmp_path / "group.err").read_text()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and 10 <= summary["step"] < STEPS
    assert ckpt(run)["step"] == summary["step"]


@pytest.mark.slow
def test_random_sigkills_then_resume_auto_match_an_uninterrupted_run(tmp_path):
    """Killed at random moments (during start-up, training, evaluation or a checkpoint
    write), restarted each time with the same command; the end state is the same."""
    steps = 400
    args = [*ARGS, f"trainer.max_steps={steps}"]
    reference = tmp_path / "reference"
    train_in_process(args, reference)
    run = tmp_path / "run"
    rng = random.Random(1234)
    kills = 0
    for attempt in range(20):
        proc = spawn(["train", *args, f"hydra.run.dir={run}", "resume=auto"], tmp_path, f"attempt{attempt}")
        if kills < 6:
            # some progress (or none: a kill during start-up), then a random delay
            target = max(evaluated_step(run), 0) + rng.choice([0, 0, 20, 40, 60])
            wait_for(lambda: evaluated_step(run) >= target, proc)
            time.sleep(rng.uniform(0, 0.3))
            if proc.poll() is None:
                proc.kill()
                proc.wait()
                kills += 1
                continue
        assert proc.wait(timeout=600) == 0, (tmp_path / f"attempt{attempt}.err").read_text()
        break
    assert kills >= 4, "the run finished before it could be killed often enough"
    assert_same_run(run, reference, steps)


def submitit_task(folder: Path) -> int | None:
    """pid of the submitit task process that runs the job whose files are under `folder`."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            environ = (proc / "environ").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "submitit.core._submit" in cmdline and str(folder) in cmdline and "SUBMITIT_LOCAL_GLOBALID=0" in environ:
            return int(proc.name)
    return None


@pytest.mark.slow
def test_submitit_requeue_continues_the_run(tmp_path, reference):
    """submitit (local executor) as on a cluster: SIGUSR2 before the time limit. The job
    writes last.ckpt, submitit requeues it, the requeued job resumes (fixed sweep dir,
    resume=auto) and ends as an uninterrupted run would."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    run = sweep / "0"
    args = ["train", "-m", "hydra/launcher=submitit_local", f"hydra.sweep.dir={sweep}", "resume=auto", *ARGS]
    proc = spawn(args, tmp_path, "submitit")
    assert wait_for(lambda: evaluated_step(run) >= 20, proc), "the job ended before the signal"
    task = submitit_task(sweep)
    assert task is not None
    os.kill(task, signal.SIGUSR2)
    assert proc.wait(timeout=600) == 0, (tmp_path / "submitit.err").read_text()
    job_logs = "".join(p.read_text() for p in sweep.glob(".submitit/*/*_log.*"))
    assert "Requeued job" in job_logs, job_logs[-2000:]
    assert "resumed from" in (run / "train.log").read_text()
    assert_same_run(run, reference)


# ------------------------------------------------------------------- in-process
def signal_at(monkeypatch, step: int, signum: int) -> None:
    """Deliver `signum` to this process during optimizer step `step` (a real signal)."""
    from topkast_cli.sparsity import TopKAST

    original = TopKAST.after_step

    def after_step(self, s, optimizer=None):
        if s == step:
            os.kill(os.getpid(), signum)
        return original(self, s, optimizer)

    monkeypatch.setattr(TopKAST, "after_step", after_step)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_finishes_the_step_writes_last_ckpt_and_resume_matches(tmp_path, reference, monkeypatch, signum):
    run = tmp_path / "run"
    signal_at(monkeypatch, 23, signum)
    with pytest.raises(SystemExit) as stopped:
        train_in_process(ARGS, run)
    assert stopped.value.code == 128 + signum
    assert ckpt(run)["step"] == 23
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["step"] == 23
    assert signal.getsignal(signum) in (signal.SIG_DFL, signal.default_int_handler), "handler not restored"
    assert [r["step"] for r in read_jsonl(run / "sparsity.jsonl")][-1] == 20, "an end record for an interrupted run"
    monkeypatch.undo()
    train_in_process([*ARGS, "resume=auto"], run)
    assert_same_run(run, reference)


def test_second_signal_exits_at_once():
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == signal.SIGTERM  # the first only asks
        with pytest.raises(SystemExit) as now:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler runs between bytecodes
                pass
        assert now.value.code == 128 + signal.SIGINT


def test_ignored_and_unhandled_signals_are_left_alone():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # e.g. a background job
    try:
        with StopSignals():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL  # nobody handles it: ours neither
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    finally:
        signal.signal(signal.SIGINT, previous)


def test_forked_child_leaves_ctrl_c_to_the_main_process_and_ends_on_sigterm():
    """DataLoader workers are forked with our handlers: a Ctrl-C (sent to the whole group)
    is the main process's to act on; SIGTERM (what `terminate()` sends) ends a worker."""
    with StopSignals() as stop:
        pid = os.fork()
        if pid == 0:  # child: sleeps through what it ignores
            for _ in range(100):
                time.sleep(0.05)
            os._exit(0)
        time.sleep(0.2)
        for _ in range(2):
            os.kill(pid, signal.SIGINT)
            time.sleep(0.2)
            assert os.waitpid(pid, os.WNOHANG) == (0, 0), "SIGINT ended the child"
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
        assert stop.received is None, "the child's signals reached the parent's state"
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM


def test_loader_that_breaks_after_a_stop_signal_ends_the_epoch_quietly():
    from topkast_cli.loop import _batches

    def loader():
        yield 1
        yield 2
        raise RuntimeError("DataLoader worker (pid 123) exited unexpectedly")

    stop = StopSignals()
    with pytest.raises(RuntimeError):
        list(_batches(loader(), stop))  # no signal: a real failure
    stop.received = signal.SIGTERM
    assert list(_batches(loader(), stop)) == [1, 2]


class SubmititLike:
    """Stands for submitit's handlers: SIGUSR2 requeues the job and exits, SIGTERM is
    logged and ignored. Records the checkpoint on disk when each is called."""

    def __init__(self, run: Path):
        self.run, self.calls = run, []

    def __call__(self, signum, frame):
        last = self.run / "checkpoints" / "last.ckpt"
        self.calls.append((signum, torch.load(last, weights_only=True)["step"] if last.exists() else None))
        if signum == signal.SIGUSR2:
            sys.exit(-1)  # what submitit does after requeueing


def test_submitit_requeue_signal_is_chained_after_the_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    handler = SubmititLike(run)
    previous = {s: signal.signal(s, handler) for s in (signal.SIGUSR2, signal.SIGTERM)}
    try:
        signal_at(monkeypatch, 17, signal.SIGUSR2)
        with pytest.raises(SystemExit) as requeued:
            train_in_process(ARGS, run)
        assert requeued.value.code == -1  # submitit's exit, not ours
        assert handler.calls == [(signal.SIGUSR2, 17)], "not called once, after last.ckpt of step 17"
        assert json.loads((run / "summary.json").read_text())["status"] == "interrupted"
        assert signal.getsignal(signal.SIGUSR2) is handler, "submitit's handler not restored"
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def test_submitit_ignored_sigterm_checkpoints_and_training_goes_on(tmp_path, monkeypatch):
    run = tmp_path / "run"
    handler = SubmititLike(run)
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        signal_at(monkeypatch, 17, signal.SIGTERM)
        summary = train_in_process([*ARGS, "trainer.max_steps=30"], run)
        assert handler.calls == [(signal.SIGTERM, 17)]
        assert summary["status"] == "completed" and summary["step"] == 30
    finally:
        signal.signal(signal.SIGTERM, previous)
