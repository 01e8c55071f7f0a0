"""Checkpoints: written atomically, checked before use.

A checkpoint is a `torch.save`d dict: format_version, step, epoch, config (plain dict),
model (state_dict of the dense θ and all other parameters/buffers, under the names of the
dense model), masks ({param: {"forward", "backward"}} bool tensors), sparsity (method state),
optimizer, scheduler, scaler, rng, metrics. Only tensors and plain Python values are stored,
so loading uses `weights_only=True` (a foreign file cannot run code).
"""

from __future__ import annotations

import os
import pickle
import random
import zipfile
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from .errors import RunFailed, UserError
from .sparsity import plain_state_dict

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "step", "config", "model", "masks")


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over `path`:
    a crash at any moment leaves either the previous complete file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def run_state(run) -> dict:
    """The checkpoint of a run (`run.Run`) at its current step."""
    sparsity = run.method.state_dict()  # first: it brings θ up to date (sparse backend)
    return {
        "format_version": FORMAT_VERSION,
        "step": run.step,
        "epoch": run.epoch,
        "config": OmegaConf.to_container(run.cfg, resolve=True),
        "model": plain_state_dict(run.model),
        "data": run.data.state_dict(),  # e.g. a text vocabulary: resuming checks it is the same
        "masks": sparsity.pop("masks"),
        "sparsity": sparsity,
        "optimizer": run.method.optimizer_state_dict(run.optimizer),  # the same form on every backend
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


def save_run(run, name: str) -> Path:
    """Write `checkpoints/<name>` of a run; never over a good file with non-finite weights.
    With several ranks, rank 0 writes (the others hold the same state) and every rank checks."""
    path = run.ckpt_dir / name
    trained = [*run.model.parameters(), *run.method.sparse_parameters()]  # (sparse backend: B's values)
    if not all(bool(torch.isfinite(p).all()) for p in trained):
        raise RunFailed(f"parameters are not finite at step {run.step}; {name} not overwritten (lower optimizer.lr?)")
    if not run.world.main:
        if name == "last.ckpt":
            run.saved_step = run.step
        return path
    try:
        save_checkpoint(path, run_state(run))
    except OSError as e:
        raise RunFailed(
            f"could not write checkpoint {path} at step {run.step}: {e.strerror or e}; "
            + (f"the previous {name} is intact" if path.exists() else f"no {name} was written")
        ) from None
    if name == "last.ckpt":
        run.saved_step = run.step
    return path


def load_checkpoint(path: str | Path, key: str = "ckpt", mmap: bool = False) -> dict:
    """Load and check a checkpoint; every problem is a one-line UserError naming `key`.
    `mmap=True` maps the tensors instead of reading them (a cheap check before a run)."""
    p = Path(path).expanduser()
    where = f"{key}={path}"
    if not p.exists():
        raise UserError(f"{where}: no such file")
    if p.is_dir():
        raise UserError(f"{where} is a directory; give the checkpoint file (e.g. {p / 'checkpoints' / 'last.ckpt'})")
    try:
        with p.open("rb") as f:
            head = f.read(4)
    except OSError as e:
        raise UserError(f"{where} cannot be read: {e.strerror or e}") from None
    if not head:
        raise UserError(f"{where} is empty (an interrupted write?); resume from another checkpoint")
    if head != b"PK\x03\x04":  # torch.save writes a zip archive
        raise UserError(f"{where} is not a topkast checkpoint (not a file written by torch.save)")
    if not zipfile.is_zipfile(p):  # the zip directory is at the end: a cut file has none
        raise UserError(f"{where} is truncated (an interrupted write or copy?); use another checkpoint")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        raise UserError(f"{where} is not a topkast checkpoint (it holds objects that are not tensors or plain values)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{where} is corrupt or not a checkpoint ({first[:100]})") from None
    if not isinstance(state, dict) or not all(k in state for k in REQUIRED_KEYS):
        raise UserError(f"{where} is not a topkast checkpoint (it lacks {', '.join(REQUIRED_KEYS)})")
    if state["format_version"] != FORMAT_VERSION:
        raise UserError(
            f"{where} has checkpoint format version {state['format_version']!r}; "
            f"this version of topkast reads version {FORMAT_VERSION}"
        )
    return state


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
