"""scikit-learn's 8x8 handwritten digits (1797 images, 10 classes; shipped with the package,
no download): a seconds-long MLP benchmark."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from ..errors import UserError
from .base import DataModule


class Digits(DataModule):
    """A stratified train/test split, the same for the same `seed`. Pixels scaled to [0, 1]."""

    num_classes, input_shape = 10, (1, 8, 8)

    def __init__(self, test_fraction: float = 0.2, seed: int = 0, **loader):
        super().__init__(**loader)
        if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
            raise UserError(f"dataset.test_fraction={test_fraction!r} must be a number in (0, 1)")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise UserError(f"dataset.seed={seed!r} must be an integer >= 0")
        self.test_fraction, self.seed = test_fraction, seed

    def setup(self) -> "Digits":
        if self.train_set is None:
            from sklearn.datasets import load_digits
            from sklearn.model_selection import train_test_split

            x, y = load_digits(return_X_y=True)
            x_train, x_test, y_train, y_test = train_test_split(
                x, y, test_size=self.test_fraction, random_state=self.seed, stratify=y
            )

            def tensors(x, y):
                return TensorDataset(torch.tensor(x / 16.0, dtype=torch.float32).view(-1, 1, 8, 8), torch.tensor(y))

            self.train_set, self.val_set = tensors(x_train, y_train), tensors(x_test, y_test)
        return self
