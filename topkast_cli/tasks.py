"""Task = loss + metric of a dataset: `loss(output, target)`, `batch_sums(output, target)`
summed over batches, then `finalize`d. A data module names its task (`DataModule.task`).

Classification (`acc1`) and next-token prediction (`NextToken`: `bpc`, `NextWord`: `ppl`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Target value of a position that is not scored (cross_entropy's default ignore_index): the
# evaluation windows of a language model overlap, and each token is scored once.
IGNORE_INDEX = -100


class Classification:
    metric = "acc1"
    higher_is_better = True

    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output, target, label_smoothing=self.label_smoothing)

    @torch.no_grad()
    def batch_sums(self, output: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-batch sums (kept on the device; summed over batches, then `finalize`d)."""
        out = {
            "loss": F.cross_entropy(output.float(), target, reduction="sum"),
            "acc1": (output.argmax(1) == target).sum(),
            "count": torch.tensor(target.numel(), device=target.device),
        }
        if output.shape[1] > 5:
            top5 = output.topk(5, dim=1).indices
            out["acc5"] = (top5 == target[:, None]).any(1).sum()
        return out

    @staticmethod
    def finalize(sums: dict[str, torch.Tensor]) -> dict[str, float]:
        n = max(1, int(sums["count"]))
        return {k: float(v) / n * (100.0 if k.startswith("acc") else 1.0) for k, v in sums.items() if k != "count"}


class NextToken:
    """Next-token prediction. `output`: logits (batch, time, vocab); `target`: token ids
    (batch, time), IGNORE_INDEX where a position is not scored. Metrics over the scored
    tokens: `loss` (mean cross-entropy in nats), `bpc` = loss / ln 2 (bits per token: per byte
    or per character, as the dataset's vocabulary is), `ppl` = exp(loss)."""

    metric = "bpc"
    higher_is_better = False

    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(
            output.flatten(0, -2), target.flatten(), ignore_index=IGNORE_INDEX, label_smoothing=self.label_smoothing
        )

    @torch.no_grad()
    def batch_sums(self, output: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        target = target.flatten()
        return {
            "loss": F.cross_entropy(output.flatten(0, -2).float(), target, ignore_index=IGNORE_INDEX, reduction="sum"),
            "count": (target != IGNORE_INDEX).sum(),
        }

    @staticmethod
    def finalize(sums: dict[str, torch.Tensor]) -> dict[str, float]:
        loss = float(sums["loss"]) / max(1, int(sums["count"]))
        return {"loss": loss, "bpc": loss / math.log(2), "ppl": math.exp(min(loss, 700.0))}


class NextWord(NextToken):
    """Next-token prediction over a word vocabulary: perplexity is the usual figure."""

    metric = "ppl"


def accumulate(total: dict | None, batch: dict) -> dict:
    if total is None:
        return {k: v.detach().clone() for k, v in batch.items()}
    for k, v in batch.items():
        total[k] += v
    return total


TASKS = {"classification": Classification, "next_token": NextToken, "next_word": NextWord}


def build_task(name: str, **kwargs):
    return TASKS[name](**kwargs)


@torch.no_grad()
def evaluate(model, loader, task, device, autocast=None, progress: bool = False, desc: str = "eval", reduce=None) -> dict:
    """Task metrics of `model` (in eval mode) over a loader; the model's mode is restored.
    `reduce` turns this loader's metric sums into the totals (several ranks: their sum)."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    total = None
    try:
        for x, y in tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast() if autocast else _null():
                out = model(x)
            total = accumulate(total, task.batch_sums(out, y))
    finally:
        model.train(was_training)
    if reduce is not None:
        total = reduce(total)
    return task.finalize(total) if total else {}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
