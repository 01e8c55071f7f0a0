"""Data-parallel training over torch.distributed: who this process is (`World`), the process
group, the DDP wrapper, and the few collectives the trainer needs beyond DDP's gradient
all-reduce (agreeing on a step's outcome, checking that masks match, summing metrics).

A process learns its place from the environment that torchrun sets (and that the SLURM
launcher exports from SLURM's): RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
MASTER_PORT. Without them it is the only rank of a world of one, and every function here is
a no-op: single-process training takes exactly the path it always took.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import RunFailed, UserError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @classmethod
    def from_env(cls) -> "World":
        if "WORLD_SIZE" not in os.environ:
            return cls()
        try:
            size = int(os.environ["WORLD_SIZE"])
            rank = int(os.environ.get("RANK", 0))
            local_rank = int(os.environ.get("LOCAL_RANK", rank))
            local_size = int(os.environ.get("LOCAL_WORLD_SIZE", size))
        except ValueError:
            raise UserError("RANK, WORLD_SIZE, LOCAL_RANK must be integers (set by torchrun or SLURM)") from None
        if not 0 <= rank < size:
            raise UserError(f"RANK={rank} is not below WORLD_SIZE={size}")
        return cls(rank, size, local_rank, local_size)

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes the run directory and shows progress."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.size}"


def device_for(world: World, name: str) -> torch.device:
    """The device of this rank (of several) for `trainer.device`: `auto` and `cuda` mean this
    rank's GPU (one per rank), `cpu` the CPU."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if name not in ("auto", "cuda"):
        raise UserError(
            f"trainer.device={name} with {world.size} processes: each rank uses its own GPU; "
            "use trainer.device=cuda (or auto)"
        )
    if not torch.cuda.is_available():
        raise UserError("trainer.device=cuda but no CUDA device is available; use trainer.device=auto or cpu")
    return torch.device("cuda", gpu_index(world))


def gpu_index(world: World) -> int:
    """This rank's GPU: cuda:LOCAL_RANK, or cuda:0 where the scheduler shows each rank only
    its own (SLURM with per-task GPU binding)."""
    count = torch.cuda.device_count()
    if count == 1:
        return 0
    if world.local_rank >= count:
        raise UserError(
            f"LOCAL_RANK={world.local_rank} but this node has {count} CUDA devices; start at most one process per device"
        )
    return world.local_rank


def setup(world: World, timeout_min: float = 30.0) -> None:
    """Join the process group (once): gloo for CPU tensors, NCCL for CUDA ones. Collectives
    that wait longer than `timeout_min` (a rank that hangs) fail instead of blocking forever."""
    if not world.active or dist.is_initialized():
        return
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(gpu_index(world))
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend, timeout=timedelta(minutes=timeout_min))


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, world: World, device: torch.device) -> torch.nn.Module:
    """The module a training step calls: DDP around `model` when there are several ranks
    (gradients of the parameters the model registers are averaged during backward), else
    `model` itself. Build it after the sparse layers are attached."""
    if not world.active:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # (Buffers, e.g. BatchNorm statistics, follow rank 0's at each forward: evaluation is the same on
    # every rank.
    return DistributedDataParallel(model, device_ids=ids)


def average_gradients(tensors: list[torch.Tensor], world: World) -> None:
    """Average the gradients of trained tensors that DDP does not see (the sparse backend's
    values, which are no parameters of the model and change size at each mask update)."""
    if not world.active:
        return
    for t in tensors:
        if t.grad is not None:
            dist.all_reduce(t.grad)
            t.grad.div_(world.size)


def all_max(values: list[int], world: World) -> list[int]:
    """The element-wise maximum over ranks of a few small integers (on the CPU)."""
    if not world.active:
        return list(values)
    t = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [int(v) for v in t]


def all_true(flag: bool, world: World) -> bool:
    """True when `flag` is true on every rank."""
    return not all_max([int(not flag)], world)[0]


def sum_metrics(sums: dict[str, torch.Tensor] | None, world: World) -> dict[str, torch.Tensor] | None:
    """Metric sums (loss sum, correct count, sample count) added over ranks, each rank having
    evaluated its own share of the data: the totals of a single-process evaluation."""
    if not world.active or sums is None:
        return sums
    keys = sorted(sums)
    t = torch.stack([sums[k].detach().double().reshape(()) for k in keys])
    dist.all_reduce(t)
    return {k: t[i] for i, k in enumerate(keys)}


def broadcast(obj, world: World):
    """Rank 0's `obj` on every rank (a picklable value)."""
    if not world.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=torch.device("cpu"))
    return box[0]


def barrier(world: World) -> None:
    if world.active:
        dist.barrier()


def check_same(digests: dict[str, torch.Tensor], world: World, step: int) -> None:
    """Stop with a clear error if any rank's digests differ from the others' (masks that
    diverged across ranks train different networks and average gradients that do not
    belong together). Cheap: one all-reduce of a few integers per layer."""
    if not world.active or not digests:
        return
    names = list(digests)
    local = torch.stack([digests[n].to("cpu", torch.int64).reshape(-1) for n in names])
    high, low = local.clone(), local.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    differ = [n for i, n in enumerate(names) if not torch.equal(high[i], low[i])]
    if differ:
        raise RunFailed(
            f"the masks differ across ranks after step {step} (layers: {', '.join(differ[:3])}"
            f"{', ...' if len(differ) > 3 else ''}); the ranks no longer train the same network: "
            "check that every rank runs the same code and config"
        )
