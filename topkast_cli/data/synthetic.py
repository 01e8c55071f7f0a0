"""Random tensors of a given shape and class count, for speed runs: no disk, no decoding.

Each sample is drawn from its own generator seeded by (seed, split, index), so the data
is the same for a given seed whatever order, batch size or worker count reads it, and
nothing but the labels is held in memory (ImageNet-sized runs need no 100 GB of tensors).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import UserError
from .base import DataModule


class RandomTensors(Dataset):
    """Sample i: standard normal, from a generator seeded by (seed, split, i); labels
    uniform over the classes, from (seed, split). numpy's SeedSequence keeps all the
    streams independent (torch's CPU generator would use only 32 bits of a seed)."""

    def __init__(self, size: int, shape: tuple, num_classes: int, seed: int, split: int):
        self.size, self.shape, self.key = size, tuple(shape), (seed, split)
        labels = np.random.default_rng([*self.key, 1]).integers(num_classes, size=size)
        self.labels = torch.from_numpy(labels)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        rng = np.random.default_rng([*self.key, 0, index])
        return torch.from_numpy(rng.standard_normal(self.shape, dtype=np.float32)), self.labels[index]


class Synthetic(DataModule):
    def __init__(
        self,
        input_shape: tuple = (3, 32, 32),
        num_classes: int = 10,
        train_size: int = 1024,
        val_size: int = 128,
        seed: int = 0,
        **loader,
    ):
        super().__init__(**loader)
        shape = list(input_shape) if isinstance(input_shape, (list, tuple)) else None
        if not shape or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
            raise UserError(f"dataset.input_shape={input_shape!r} must be a list of integers >= 1, e.g. [3, 32, 32]")
        for key, value, lo in (("num_classes", num_classes, 2), ("train_size", train_size, 1), ("val_size", val_size, 1), ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise UserError(f"dataset.{key}={value!r} must be an integer >= {lo}")
        self.input_shape, self.num_classes = tuple(shape), num_classes
        self.train_size, self.val_size, self.seed = train_size, val_size, seed

    def setup(self) -> "Synthetic":
        if self.train_set is None:
            self.train_set = RandomTensors(self.train_size, self.input_shape, self.num_classes, self.seed, 0)
            self.val_set = RandomTensors(self.val_size, self.input_shape, self.num_classes, self.seed, 1)
        return self
