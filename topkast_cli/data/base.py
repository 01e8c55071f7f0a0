"""DataModule: what the trainer needs from a dataset, and resumable epoch sampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import UserError, check_int


class EpochSampler(Sampler):
    """Shuffled indices for one epoch, from a generator seeded by (seed, epoch), starting at
    `start`: a run resumed in the middle of an epoch sees exactly the remaining samples.

    With `world` > 1 processes, rank `rank` gets its share: of a training epoch (`batch_size`
    given, the global batch), its contiguous slice of each global batch, so the ranks
    together see exactly the batches one process would; of an evaluation, every
    `world`-th sample."""

    def __init__(self, size: int, seed: int, epoch: int, start: int = 0, shuffle: bool = True,
                 rank: int = 0, world: int = 1, batch_size: int | None = None):
        self.size, self.seed, self.epoch, self.start, self.shuffle = size, seed, epoch, start, shuffle
        self.rank, self.world, self.batch_size = rank, world, batch_size

    def _order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.size)
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.size, generator=g)

    def _indices(self) -> torch.Tensor:
        order = self._order()[self.start :]
        if self.world == 1:
            return order
        if self.batch_size is None:
            return order[self.rank :: self.world]
        full = len(order) // self.batch_size * self.batch_size  # (the last partial batch is dropped)
        return order[:full].view(-1, self.world, self.batch_size // self.world)[:, self.rank].reshape(-1)

    def __iter__(self):
        return iter(self._indices().tolist())

    def __len__(self) -> int:
        return len(self._indices())


class SeededSamples(Dataset):
    """Sample i of epoch e is loaded with torch's RNG seeded from (seed, e, i), so random
    augmentation is the same whichever worker loads it and wherever a run resumes; the
    caller's RNG state is left as it was."""

    def __init__(self, dataset: Dataset, seed: int, epoch: int):
        self.dataset, self.seed, self.epoch = dataset, seed, epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        # torch's CPU generator keeps 32 bits of a seed: mix the three numbers into 32 bits.
        (sample_seed,) = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(sample_seed))
            return self.dataset[index]


class DataModule:
    """A train split and a held-out split (`val`: the dataset's validation or test set),
    with the loaders the trainer iterates. Subclasses build `train_set` and `val_set` in
    `setup()` and set `num_classes` and `input_shape` (per-sample shape, e.g. (3, 32, 32))."""

    task = "classification"
    num_classes: int
    input_shape: tuple
    random_train_transform = False  # True: train samples are augmented (see SeededSamples)

    def __init__(self, batch_size: int = 128, eval_batch_size: int | None = None, num_workers: int = 0):
        self.batch_size = check_int("dataset.batch_size", batch_size)
        self.eval_batch_size = check_int("dataset.eval_batch_size", eval_batch_size or batch_size)
        self.num_workers = check_int("dataset.num_workers", num_workers, lo=0)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.rank, self.world = 0, 1  # this process's share of the data (see `shard`)
        self.pin_memory = False  # page-locked batches, for asynchronous copies to a GPU (set by the run)

    def shard(self, rank: int, world: int) -> "DataModule":
        """Make the loaders give rank `rank` of `world` processes its share: `batch_size` stays
        the global batch, each rank training on batch_size / world samples of it."""
        if self.batch_size % world:
            raise UserError(
                f"dataset.batch_size={self.batch_size} (the global batch) is not divisible by the {world} "
                f"processes; use a multiple of {world}"
            )
        self.rank, self.world = rank, world
        return self

    def check(self) -> None:
        """Cheap checks that need the disk but load nothing, run before a run directory is
        made: by default, a `root` that does not exist is an error unless `download` is on.
        Subclasses that know their files may check more."""
        root = getattr(self, "root", None)
        if getattr(self, "download", None) is False and isinstance(root, str) and root:
            path = Path(root).expanduser()
            if not path.is_dir():
                what = "is not a directory" if path.exists() else "does not exist"
                raise UserError(f"dataset.root={root} {what}; point it at the data, or set dataset.download=true")

    @property
    def model_kwargs(self) -> dict | None:
        """What the model is sized by, passed to its constructor (None: not known before the
        data is loaded). Classification: `num_classes` and the per-sample `input_shape`."""
        if getattr(self, "num_classes", None) is None or getattr(self, "input_shape", None) is None:
            return None
        return {"num_classes": self.num_classes, "input_shape": tuple(self.input_shape)}

    def describe(self) -> str:
        """The data's shape in words, for error messages."""
        return f"samples of shape {list(self.input_shape)}, {self.num_classes} classes"

    def state_dict(self) -> dict:
        """What a checkpoint must agree on with the data it is loaded with (e.g. a text
        vocabulary); empty when the config says it all."""
        return {}

    def check_state(self, state: dict | None, where: str) -> None:
        """Raise a UserError if a checkpoint's data state (`state_dict`) differs from this
        data's; None (older checkpoints, or not known yet) checks nothing."""

    def example_batch(self, n: int = 2, device: torch.device | str = "meta") -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of the shapes and dtypes the loaders yield (values undefined), for checking
        that a model fits the data before any is loaded (on the meta device)."""
        return torch.empty((n, *self.input_shape), device=device), torch.empty(n, dtype=torch.long, device=device)

    def setup(self) -> "DataModule":
        """Load or generate the data (may read from disk); idempotent."""
        raise NotImplementedError

    def _loader(self, dataset, batch_size, sampler, drop_last, seed):
        workers = self.num_workers
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=workers,
            pin_memory=self.pin_memory,
            prefetch_factor=4 if workers else None,  # batches each worker loads ahead
            persistent_workers=False,  # (a loader lives one epoch: resumable sampling)
            # Worker seeds come from this generator, not from the global RNG.
            generator=torch.Generator().manual_seed(seed),
        )

    @property
    def steps_per_epoch(self) -> int:
        n = len(self.train_set) // self.batch_size
        if n == 0:
            raise UserError(
                f"dataset.batch_size={self.batch_size} is larger than the training set ({len(self.train_set)} samples)"
            )
        return n

    def train_loader(self, epoch: int, seed: int, start_batch: int = 0) -> DataLoader:
        """Shuffled full batches of epoch `epoch`, from batch `start_batch` on."""
        sampler = EpochSampler(
            len(self.train_set), seed, epoch, start_batch * self.batch_size, rank=self.rank, world=self.world,
            batch_size=self.batch_size,
        )
        dataset = SeededSamples(self.train_set, seed, epoch) if self.random_train_transform else self.train_set
        # (each rank's stream of worker seeds differs: samples are seeded by index, not worker)
        worker_seed = (seed * 100_003 + epoch) * self.world + self.rank
        return self._loader(dataset, self.batch_size // self.world, sampler, True, worker_seed)

    def eval_loader(self, split: str = "val") -> DataLoader:
        dataset = {"val": self.val_set, "train": self.train_set}.get(split)
        if dataset is None:
            raise UserError(f"split={split!r} is not known; allowed: val, train")
        return self._eval_loader(dataset)

    def _eval_loader(self, dataset) -> DataLoader:
        """All of `dataset` in order (this rank's share of it), in batches of eval_batch_size."""
        sampler = EpochSampler(len(dataset), 0, 0, shuffle=False, rank=self.rank, world=self.world)
        # (eval_batch_size is global, as batch_size: each rank takes its share)
        return self._loader(dataset, max(1, self.eval_batch_size // self.world), sampler, False, self.rank)
