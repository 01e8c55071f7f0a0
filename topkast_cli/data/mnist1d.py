"""MNIST-1D (Greydanus 2020), generated locally by the `mnist1d` package: no download."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from ..errors import UserError
from .base import DataModule


class MNIST1D(DataModule):
    """4000 train / 1000 test sequences of length 40, 10 classes (the package defaults).

    Generation takes a few seconds, so the tensors are cached under `root` (keyed by the
    generation arguments); `root: null` disables the cache.
    """

    num_classes = 10

    def __init__(self, root: str | None = None, num_samples: int = 5000, train_split: float = 0.8, seed: int = 42, **loader):
        super().__init__(**loader)
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 10:
            raise UserError(f"dataset.num_samples={num_samples!r} must be an integer >= 10")
        if isinstance(train_split, bool) or not isinstance(train_split, (int, float)) or not 0 < train_split < 1:
            raise UserError(f"dataset.train_split={train_split!r} must be a number in (0, 1)")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
            raise UserError(f"dataset.seed={seed!r} must be an integer in [0, 2**32)")
        if root is not None and not isinstance(root, str):
            raise UserError(f"dataset.root={root!r} must be a directory path or null")
        self.root, self.num_samples, self.train_split, self.seed = root, num_samples, train_split, seed
        self.input_shape = (1, 40)

    def _generate(self) -> dict:
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        args.num_samples, args.train_split, args.seed = self.num_samples, self.train_split, self.seed
        d = make_dataset(args)
        return {k: torch.as_tensor(d[k]) for k in ("x", "y", "x_test", "y_test")}

    def setup(self) -> "MNIST1D":
        if self.train_set is not None:
            return self
        key = json.dumps([self.num_samples, self.train_split, self.seed])
        cache = None
        if self.root:
            name = f"mnist1d-{hashlib.sha1(key.encode()).hexdigest()[:10]}.pt"
            cache = Path(self.root).expanduser() / name
        data = None
        if cache is not None and cache.is_file():
            try:
                data = torch.load(cache, weights_only=True)
            except Exception:  # a torn cache file is simply regenerated
                data = None
        if data is None:
            data = self._generate()
            if cache is not None:
                try:
                    cache.parent.mkdir(parents=True, exist_ok=True)
                    tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
                    torch.save(data, tmp)
                    tmp.replace(cache)
                except OSError:
                    pass  # the cache is an optimisation only
        x, xt = data["x"].float().unsqueeze(1), data["x_test"].float().unsqueeze(1)
        self.train_set = TensorDataset(x, data["y"].long())
        self.val_set = TensorDataset(xt, data["y_test"].long())
        return self
