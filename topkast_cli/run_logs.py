"""Run outputs: append-only JSON-lines logs, TensorBoard scalars, atomic JSON files."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

from tqdm.auto import tqdm


def read_jsonl(path: str | Path) -> list[dict]:
    """Records of a JSON-lines file; a torn line (a crash mid-write) is skipped."""
    records = []
    p = Path(path)
    if not p.is_file():
        return records
    with p.open() as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def _clean(value):
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class JsonlLog:
    """Append-only JSON lines; each record is flushed so a kill loses at most the last line.
    `last_step` is the step of the last record (None for an empty log)."""

    def __init__(self, path: str | Path, truncate_after_step: int | None = None, write: bool = True):
        self.path = Path(path)
        self.last_step = None
        self._file = None  # (write=False: records are counted, not written)
        if not write:
            return
        if truncate_after_step is not None and self.path.exists():
            self._drop_after(truncate_after_step)
        self._file = self.path.open("a")

    def _drop_after(self, step: int) -> None:
        # On resume, records written after the checkpoint's step belong to a future that is
        # about to be recomputed: keep the log a single consistent history. (A fresh start
        # over the logs of a run that never wrote a checkpoint drops them all: step -1.)
        kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self.last_step = kept[-1].get("step") if kept else None

    def write(self, record: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps(_clean(record)) + "\n")
            self._file.flush()
        self.last_step = record.get("step")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def write_json_atomic(path: str | Path, data: dict) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        json.dump(_clean(data), f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunLogs:
    """metrics.jsonl, sparsity.jsonl and TensorBoard (tb/) of one run directory.

    `resume_step` (when resuming from a checkpoint of that step) drops the records after it
    from the JSON logs and hides TensorBoard's (purge_step = resume_step + 1: the records *of*
    that step were written before the checkpoint and stay), so a resumed run has no duplicate
    or out-of-order points. `resume_step=-1` clears logs left by a run that wrote no checkpoint.
    `write=False` (every rank but 0) writes nothing.
    """

    def __init__(self, run_dir: str | Path, resume_step: int | None = None, tensorboard: bool = True, write: bool = True):
        self.run_dir = Path(run_dir)
        if write:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = JsonlLog(self.run_dir / "metrics.jsonl", resume_step, write)
        self.sparsity = JsonlLog(self.run_dir / "sparsity.jsonl", resume_step, write)
        self.tb = None
        self.churn: dict[str, list[float]] = {}  # layer -> churn at each refresh (the churn image)
        for record in read_jsonl(self.sparsity.path) if write and resume_step is not None else ():
            for name, layer in record.get("layers", {}).items():
                self.churn.setdefault(name, []).append(layer.get("churn", 0.0))
        if tensorboard and write:
            from torch.utils.tensorboard import SummaryWriter

            tb_dir = self.run_dir / "tb"
            purge = None
            if resume_step is not None and tb_dir.is_dir() and any(tb_dir.iterdir()):
                purge = resume_step + 1
            self.tb = SummaryWriter(str(tb_dir), purge_step=purge)

    def scalars(self, prefix: str, values: dict, step: int) -> None:
        if self.tb is None:
            return
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.tb.add_scalar(f"{prefix}/{k}", v, step)

    def log_metrics(self, step: int, split: str, values: dict) -> None:
        self.metrics.write({"step": step, "split": split, **values})
        self.scalars(split, values, step)

    def log_sparsity(self, record: dict) -> None:
        self.sparsity.write(record)
        step = record["step"]
        self.scalars("sparsity", {k: record[k] for k in ("forward_density", "backward_density")}, step)
        layers = record.get("layers", {})
        if layers:
            churn = sum(l["churn"] * l["numel"] * l["forward_density"] for l in layers.values())
            kept = sum(l["numel"] * l["forward_density"] for l in layers.values())
            self.scalars("sparsity", {"churn": churn / max(kept, 1)}, step)
        for name, layer in layers.items():
            keys = ("forward_density", "backward_density", "churn", "promotions")
            self.scalars(f"sparsity/{name}", {k: layer[k] for k in keys if k in layer}, step)
            self.churn.setdefault(name, []).append(layer["churn"])

    def histograms(self, prefix: str, values: dict, step: int) -> None:
        """One TensorBoard histogram per tensor of `values` (empty ones are skipped)."""
        if self.tb is None:
            return
        for key, tensor in values.items():
            if tensor.numel():
                self.tb.add_histogram(f"{prefix}/{key}", tensor, step)

    def churn_image(self, step: int) -> None:
        """Per-layer churn over time as an image (a row per layer, a column per refresh, up to
        the last 1000; colour: churn / the image's largest churn)."""
        if self.tb is None or not self.churn:
            return
        import numpy as np
        from matplotlib import colormaps

        width = max(len(v) for v in self.churn.values())
        grid = np.zeros((len(self.churn), min(width, 1000)))
        for row, values in enumerate(self.churn.values()):
            values = values[-grid.shape[1]:]
            grid[row, : len(values)] = values
        grid = grid / max(grid.max(), 1e-12)
        rgb = colormaps["viridis"](np.repeat(grid, 8, axis=0))[..., :3]  # 8 pixels per layer
        self.tb.add_image("sparsity/churn", rgb, step, dataformats="HWC")

    def log_hparams(self, hparams: dict, metrics: list[str]) -> None:
        """Hyperparameters for TensorBoard's HPARAMS view, written into this run's own event
        file (`add_hparams` would put them in a separate sub-run): the metric columns are
        this run's scalar tags, shown at their latest value."""
        if self.tb is None:
            return
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        values = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
        experiment, start, _ = hparams_summaries(values, {m: 0.0 for m in metrics})
        writer = self.tb._get_file_writer()
        writer.add_summary(experiment)
        writer.add_summary(start)

    def end_hparams(self) -> None:
        """Mark the run's HPARAMS session as finished successfully."""
        if self.tb is None:
            return
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        self.tb._get_file_writer().add_summary(hparams_summaries({}, {})[2])

    def flush(self, step: int | None = None) -> None:
        if self.tb is not None:
            if step is not None:
                self.churn_image(step)
            self.tb.flush()

    def close(self) -> None:
        self.metrics.close()
        self.sparsity.close()
        if self.tb is not None:
            self.tb.close()


class TqdmHandler(logging.StreamHandler):
    """Console log handler that writes through tqdm, so log lines do not break the bar."""

    def emit(self, record):
        try:
            tqdm.write(self.format(record))
        except Exception:
            self.handleError(record)
